/* skiff-vsock: the guest's end of a vsock stream, stdin to the socket and the socket
 * to stdout (busybox has no vsock). For the Debian boot test and bench/net.py.
 *
 *   skiff-vsock connect CID PORT    connect (CID 2 is the host) and copy both ways
 *   skiff-vsock listen PORT         accept one connection and copy both ways
 *   skiff-vsock echo PORT N         accept N connections, all open at once, and echo
 *                                   each until its peer shuts its write side (then
 *                                   shut ours: a half-close); prints "echo N BYTES"
 *
 * When stdin ends, the socket's write side is shut (the peer reads EOF); the program
 * ends when the peer's side ends. Build: gcc -O2 -static -o skiff-vsock skiff-vsock.c
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static int copy(int from, int to) {
    char buf[65536];
    ssize_t n = read(from, buf, sizeof buf);
    if (n <= 0)
        return (int)n;
    for (ssize_t off = 0; off < n;) {
        ssize_t w = write(to, buf + off, (size_t)(n - off));
        if (w < 0)
            return -1;
        off += w;
    }
    return 1;
}

#define MAX_ECHO 256

/* Echoes N connections at once on one poll loop: what a peer sends comes back; a
 * peer's half-close is answered with ours once its data went back. */
static int echo(int l, int n) {
    struct pollfd p[MAX_ECHO + 1];
    int accepted = 0, open = 0;
    long long bytes = 0;
    if (n < 1 || n > MAX_ECHO || listen(l, n) < 0)
        return 2;
    p[0] = (struct pollfd){.fd = l, .events = POLLIN};
    for (int i = 1; i <= n; i++)
        p[i] = (struct pollfd){.fd = -1, .events = POLLIN};
    while (accepted < n || open > 0) {
        if (poll(p, (nfds_t)n + 1, -1) < 0 && errno != EINTR)
            return 1;
        if (p[0].revents && accepted < n) {
            int c = accept(l, 0, 0);
            if (c >= 0) {
                p[++accepted].fd = c;
                open++;
            }
            if (accepted == n)
                p[0].fd = -1;
        }
        for (int i = 1; i <= accepted; i++) {
            if (p[i].fd < 0 || !p[i].revents)
                continue;
            char buf[65536];
            ssize_t r = read(p[i].fd, buf, sizeof buf);
            if (r > 0 && write(p[i].fd, buf, (size_t)r) == r) {
                bytes += r;
                continue;
            }
            shutdown(p[i].fd, SHUT_WR);
            close(p[i].fd);
            p[i].fd = -1;
            open--;
        }
    }
    printf("echo %d %lld\n", accepted, bytes);
    return 0;
}

int main(int argc, char **argv) {
    struct sockaddr_vm sa = {.svm_family = AF_VSOCK};
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0) {
        perror("socket(AF_VSOCK)");
        return 1;
    }
    if (argc == 4 && !strcmp(argv[1], "connect")) {
        sa.svm_cid = (unsigned)strtoul(argv[2], 0, 10);
        sa.svm_port = (unsigned)strtoul(argv[3], 0, 10);
        if (connect(s, (struct sockaddr *)&sa, sizeof sa) < 0) {
            perror("connect");
            return 1;
        }
    } else if (argc == 3 && !strcmp(argv[1], "listen")) {
        sa.svm_cid = VMADDR_CID_ANY;
        sa.svm_port = (unsigned)strtoul(argv[2], 0, 10);
        int l = s;
        if (bind(l, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(l, 1) < 0) {
            perror("bind/listen");
            return 1;
        }
        s = accept(l, 0, 0);
        if (s < 0) {
            perror("accept");
            return 1;
        }
        close(l);
    } else if (argc == 4 && !strcmp(argv[1], "echo")) {
        sa.svm_cid = VMADDR_CID_ANY;
        sa.svm_port = (unsigned)strtoul(argv[2], 0, 10);
        if (bind(s, (struct sockaddr *)&sa, sizeof sa) < 0) {
            perror("bind");
            return 1;
        }
        return echo(s, atoi(argv[3]));
    } else {
        fprintf(stderr, "usage: skiff-vsock connect CID PORT | listen PORT | echo PORT N\n");
        return 2;
    }
    struct pollfd p[2] = {{.fd = 0, .events = POLLIN}, {.fd = s, .events = POLLIN}};
    for (;;) {
        if (poll(p, 2, -1) < 0 && errno != EINTR)
            return 1;
        if (p[0].revents) {
            int r = copy(0, s);
            if (r <= 0) {
                shutdown(s, SHUT_WR);
                p[0].fd = -1;
            }
        }
        if (p[1].revents) {
            int r = copy(s, 1);
            if (r <= 0)
                return r < 0;
        }
    }
}
