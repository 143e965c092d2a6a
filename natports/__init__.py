"""natports: public TCP/UDP ports for Dokku apps through kernel DNAT."""

__version__ = "0.1.0"
