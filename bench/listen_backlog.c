/* LD_PRELOAD shim for the benchmark's OpenSMTPD, built by bench/peers-install
 * (cc -O2 -shared -fPIC -o listen_backlog.so listen_backlog.c -ldl).
 *
 * listen(): a backlog of at least $BENCH_LISTEN_BACKLOG. OpenSMTPD 6.8 compiles in a listen
 * backlog of 5 (SMTPD_BACKLOG) and has no setting for it; with 20 clients connecting at once
 * the kernel drops the SYNs beyond it and each dropped client waits 1 s, 3 s, ... to retry.
 * mailgate listens with 4096 and the bench gives Sendmail DaemonPortOptions Listen=4096.
 *
 * connect(): with $BENCH_TCP_NODELAY set, TCP_NODELAY on the outgoing TCP socket. Its SMTP
 * client leaves Nagle on and writes the final "." of a message as a small segment of its own,
 * which waits for the ACK of the body that the next hop delays by 40 ms: 40 ms per message on
 * a connection it reuses for 100 messages, ~20 messages/s to one next hop (seen with strace:
 * 41 ms between its read of 354 and of the 250). The other relays' clients do not wait so. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <sys/socket.h>

int listen(int fd, int backlog)
{
    static int (*real_listen)(int, int);
    const char *want = getenv("BENCH_LISTEN_BACKLOG");
    int at_least = want ? atoi(want) : 0;

    if (real_listen == NULL)
        real_listen = (int (*)(int, int))dlsym(RTLD_NEXT, "listen");
    return real_listen(fd, backlog < at_least ? at_least : backlog);
}

int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    static int (*real_connect)(int, const struct sockaddr *, socklen_t);
    int type = 0, one = 1;
    socklen_t tlen = sizeof type;

    if (real_connect == NULL)
        real_connect = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
    if (getenv("BENCH_TCP_NODELAY") != NULL && addr != NULL
        && (addr->sa_family == AF_INET || addr->sa_family == AF_INET6)
        && getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tlen) == 0 && type == SOCK_STREAM)
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return real_connect(fd, addr, len);
}
