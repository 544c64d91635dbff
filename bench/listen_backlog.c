/* LD_PRELOAD shim for the benchmark's OpenSMTPD: listen() with a backlog of at least
 * $BENCH_LISTEN_BACKLOG. OpenSMTPD 6.8 compiles in a listen backlog of 5 (SMTPD_BACKLOG) and
 * has no setting for it; with 20 clients connecting at once the kernel drops the SYNs beyond
 * it and each dropped client waits 1 s, 3 s, ... to retry. mailgate listens with 4096 and the
 * bench gives Sendmail DaemonPortOptions Listen=4096; this gives OpenSMTPD the same. Built by
 * bench/peers-install (cc -shared -fPIC -o listen_backlog.so listen_backlog.c -ldl). */
#define _GNU_SOURCE
#include <dlfcn.h>
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
