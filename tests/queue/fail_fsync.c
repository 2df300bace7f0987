/* Preloaded into the daemon by tests/queue.rs: while the file named by
 * FAIL_FSYNC_WHEN exists, fsync and fdatasync of a SQLite write-ahead log
 * (a file whose name ends in "-wal") fail with EIO, after the data was
 * written. That is a disk that fails to make a commit durable. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int failing(int fd) {
    const char *when = getenv("FAIL_FSYNC_WHEN");
    if (when == NULL || access(when, F_OK) != 0) return 0;
    char link[64], path[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 4) return 0;
    path[n] = '\0';
    return strcmp(path + n - 4, "-wal") == 0;
}

int fsync(int fd) {
    static int (*real)(int);
    if (real == NULL) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    if (failing(fd)) { errno = EIO; return -1; }
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (real == NULL) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    if (failing(fd)) { errno = EIO; return -1; }
    return real(fd);
}
