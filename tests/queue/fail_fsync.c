/* Preloaded into the daemon by tests/queue.rs: while the file named by
 * FAIL_FSYNC_WHEN exists, fsync and fdatasync of a file whose name ends in
 * FAIL_FSYNC_SUFFIX (by default "-wal": a SQLite write-ahead log) fail with
 * EIO, after the data was written. That is a disk that fails to make a
 * write durable. */
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
    const char *suffix = getenv("FAIL_FSYNC_SUFFIX");
    if (suffix == NULL) suffix = "-wal";
    size_t len = strlen(suffix);
    if (n < (ssize_t)len) return 0;
    path[n] = '\0';
    return strcmp(path + n - len, suffix) == 0;
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
