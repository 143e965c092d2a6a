"""Ways of making the kernel (or a proxy) send new flows where the routes say."""
