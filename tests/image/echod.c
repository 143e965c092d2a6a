/*
 * echod: the backend of natports' tests and demo.
 *
 * Usage: echod TAG PORT [PORT...]
 * For each PORT it serves TCP and UDP on all addresses, IPv4 and (where the container
 * has it) IPv6.
 *   TCP: sends "TAG\n" on accept, then answers every line L with "TAG L\n".
 *   UDP: answers every datagram D with "TAG D".
 * The tag lets a test see which container (release) answered. A line or datagram
 * "?peer" is answered with "TAG ?peer ADDRESS": the client's address as the container
 * sees it (an IPv4 client on the dual-stack socket is printed as IPv4), which tells
 * whether a backend kept it.
 * Built static so that a busybox-only image can run it.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *tag;

/* Dual-stack (one v6 socket that also takes v4, as v4-mapped addresses) where the
 * container has IPv6; a plain v4 socket where the kernel refuses AF_INET6. */
static int listen_on(int type, int port) {
    int one = 1, zero = 0;
    int fd = socket(AF_INET6, type, 0);
    if (fd >= 0) {
        struct sockaddr_in6 sa6;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
        memset(&sa6, 0, sizeof sa6);
        sa6.sin6_family = AF_INET6;
        sa6.sin6_port = htons((unsigned short)port);
        sa6.sin6_addr = in6addr_any;
        if (bind(fd, (struct sockaddr *)&sa6, sizeof sa6) == 0) {
            if (type == SOCK_STREAM && listen(fd, 1024) < 0) { perror("listen"); exit(1); }
            return fd;
        }
        close(fd);
    }
    struct sockaddr_in sa;
    fd = socket(AF_INET, type, 0);
    if (fd < 0) { perror("socket"); exit(1); }
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((unsigned short)port);
    sa.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) { perror("bind"); exit(1); }
    if (type == SOCK_STREAM && listen(fd, 1024) < 0) { perror("listen"); exit(1); }
    return fd;
}

/* The text of a peer address; IPv4-mapped IPv6 addresses as plain IPv4. */
static void peer_text(const struct sockaddr_storage *peer, char *out, size_t size) {
    if (peer->ss_family == AF_INET6) {
        const struct sockaddr_in6 *p6 = (const struct sockaddr_in6 *)peer;
        if (IN6_IS_ADDR_V4MAPPED(&p6->sin6_addr))
            inet_ntop(AF_INET, &p6->sin6_addr.s6_addr[12], out, (socklen_t)size);
        else
            inet_ntop(AF_INET6, &p6->sin6_addr, out, (socklen_t)size);
    } else {
        inet_ntop(AF_INET, &((const struct sockaddr_in *)peer)->sin_addr, out, (socklen_t)size);
    }
}

/* The answer to one line or datagram: "TAG L", or "TAG ?peer ADDRESS" for "?peer". */
static int answer(char *out, size_t size, const char *in, const struct sockaddr_storage *peer) {
    if (strcmp(in, "?peer") == 0) {
        char addr[INET6_ADDRSTRLEN] = "?";
        peer_text(peer, addr, sizeof addr);
        return snprintf(out, size, "%s ?peer %s", tag, addr);
    }
    return snprintf(out, size, "%s %s", tag, in);
}

static void write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) _exit(0);
        buf += n;
        len -= (size_t)n;
    }
}

static void serve_tcp_client(int fd) {
    char in[4096], line[4096], out[8192];
    size_t used = 0;
    struct sockaddr_storage peer;
    socklen_t plen = sizeof peer;
    memset(&peer, 0, sizeof peer);
    getpeername(fd, (struct sockaddr *)&peer, &plen);
    int n = snprintf(out, sizeof out, "%s\n", tag);
    write_all(fd, out, (size_t)n);
    for (;;) {
        ssize_t got = read(fd, in, sizeof in);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) _exit(0);
        for (ssize_t i = 0; i < got; i++) {
            if (in[i] == '\n' || used == sizeof line - 1) {
                line[used] = '\0';
                n = answer(out, sizeof out - 1, line, &peer);
                if (n > (int)sizeof out - 2) n = (int)sizeof out - 2;  /* truncated */
                out[n++] = '\n';
                write_all(fd, out, (size_t)n);
                used = 0;
            } else {
                line[used++] = in[i];
            }
        }
    }
}

static void serve_tcp(int lfd) {
    for (;;) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) continue;
        pid_t pid = fork();
        if (pid == 0) { close(lfd); serve_tcp_client(fd); }
        close(fd);
    }
}

static void serve_udp(int fd) {
    char in[2048], out[4096];
    for (;;) {
        struct sockaddr_storage peer;
        socklen_t plen = sizeof peer;
        ssize_t got = recvfrom(fd, in, sizeof in - 1, 0, (struct sockaddr *)&peer, &plen);
        if (got < 0) continue;
        in[got] = '\0';
        int n = answer(out, sizeof out, in, &peer);
        sendto(fd, out, (size_t)n, 0, (struct sockaddr *)&peer, plen);
    }
}

static void on_term(int sig) {
    (void)sig;
    _exit(0);
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: echod TAG PORT [PORT...]\n"); return 2; }
    tag = argv[1];
    signal(SIGCHLD, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    for (int i = 2; i < argc; i++) {
        int port = atoi(argv[i]);
        int tfd = listen_on(SOCK_STREAM, port);
        int ufd = listen_on(SOCK_DGRAM, port);
        if (fork() == 0) serve_tcp(tfd);
        if (fork() == 0) serve_udp(ufd);
    }
    /* PID 1 in a container ignores signals without a handler: exit on SIGTERM like a real app. */
    signal(SIGTERM, on_term);
    for (;;) pause();
}
