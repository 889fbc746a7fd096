/*
 * ceiling.c -- the "no Python at all" reference for benches/bench.py.
 *
 * Moves the same bytes through the same kind of descriptor with plain
 * write(2)/read(2): fork, the parent writes, the child reads.  Every frame
 * is an 8-byte big-endian length header followed by the payload.
 *
 *   ceiling stream   TRANSPORT SIZE COUNT [WARMUP]
 *       parent sends COUNT frames of SIZE bytes.  SIZE <= 64 KiB: one
 *       write() per frame (header + payload in one buffer).  Larger: one
 *       write() for the header, then write() calls for the payload.  The
 *       child reads through a 256 KiB buffer and copies each payload into a
 *       message buffer (what "delivering a message" costs at minimum).  The
 *       child keeps that buffer, so only the first large message faults it in.
 *       WARMUP frames go first, untimed (the clock starts once the child has
 *       them).
 *   ceiling pingpong TRANSPORT SIZE COUNT WARMUP
 *       round trips of one SIZE-byte frame; median and p99 in us.
 *   ceiling spawn    COUNT WARMUP
 *       fork() + _exit(0) + waitpid(); median ms.
 *
 * TRANSPORT: pipe      -- pipe(2), default capacity
 *            pipe1m    -- pipe(2) with F_SETPIPE_SZ = 1 MiB
 *            unix      -- socketpair(AF_UNIX, SOCK_STREAM)
 *
 * Timing (parent): from after the child signals "ready" on a separate
 * sync pipe to the child's "done" byte on that pipe.  Prints one JSON line.
 *
 * Build: cc -O2 -o ceiling ceiling.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define SMALL_FRAME 65536
#define RBUF_SIZE (256 * 1024)

static void die(const char *what) {
    fprintf(stderr, "ceiling: %s: %s\n", what, strerror(errno));
    exit(2);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void put_be64(unsigned char *p, uint64_t v) {
    for (int i = 7; i >= 0; i--) {
        p[i] = (unsigned char)(v & 0xff);
        v >>= 8;
    }
}

static uint64_t get_be64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
    return v;
}

static void write_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n > 0) {
        ssize_t k = write(fd, p, n);
        if (k < 0) {
            if (errno == EINTR) continue;
            die("write");
        }
        p += k;
        n -= (size_t)k;
    }
}

static void read_all(int fd, void *buf, size_t n) {
    char *p = buf;
    while (n > 0) {
        ssize_t k = read(fd, p, n);
        if (k < 0) {
            if (errno == EINTR) continue;
            die("read");
        }
        if (k == 0) {
            fprintf(stderr, "ceiling: unexpected EOF\n");
            exit(2);
        }
        p += k;
        n -= (size_t)k;
    }
}

/* A buffered frame reader. */
typedef struct {
    int fd;
    unsigned char *buf;
    size_t start, end;
} reader_t;

static void reader_init(reader_t *r, int fd) {
    r->fd = fd;
    r->buf = malloc(RBUF_SIZE);
    if (!r->buf) die("malloc");
    r->start = r->end = 0;
}

/* Make at least `need` bytes (<= RBUF_SIZE) available in the buffer. */
static void reader_fill(reader_t *r, size_t need) {
    if (r->end - r->start >= need) return;
    if (r->start > 0) {
        memmove(r->buf, r->buf + r->start, r->end - r->start);
        r->end -= r->start;
        r->start = 0;
    }
    while (r->end < need) {
        ssize_t k = read(r->fd, r->buf + r->end, RBUF_SIZE - r->end);
        if (k < 0) {
            if (errno == EINTR) continue;
            die("read");
        }
        if (k == 0) {
            fprintf(stderr, "ceiling: unexpected EOF\n");
            exit(2);
        }
        r->end += (size_t)k;
    }
}

/* Read one frame into *msg (grown as needed); return its length. */
static size_t reader_frame(reader_t *r, unsigned char **msg, size_t *cap) {
    reader_fill(r, 8);
    size_t n = (size_t)get_be64(r->buf + r->start);
    r->start += 8;
    if (n > *cap) {
        free(*msg);
        *msg = malloc(n ? n : 1);
        if (!*msg) die("malloc");
        *cap = n;
    }
    if (n <= RBUF_SIZE) {
        reader_fill(r, n);
        memcpy(*msg, r->buf + r->start, n);
        r->start += n;
    } else {
        size_t have = r->end - r->start;
        memcpy(*msg, r->buf + r->start, have);
        r->start = r->end = 0;
        read_all(r->fd, *msg + have, n - have);
    }
    return n;
}

/* ---- transports ------------------------------------------------------ */

typedef struct {
    int p2c[2]; /* [0] child reads, [1] parent writes */
    int c2p[2]; /* [0] parent reads, [1] child writes */
} chan_t;

static void set_pipe_size(int fd, int size) {
#ifdef F_SETPIPE_SZ
    if (fcntl(fd, F_SETPIPE_SZ, size) < 0) die("F_SETPIPE_SZ");
#else
    (void)fd;
    (void)size;
    errno = ENOTSUP;
    die("F_SETPIPE_SZ");
#endif
}

static void make_chan(const char *transport, chan_t *c) {
    if (strcmp(transport, "unix") == 0) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0) die("socketpair");
        /* parent uses sv[1] both ways, child sv[0] */
        c->p2c[0] = sv[0];
        c->p2c[1] = sv[1];
        c->c2p[0] = sv[1];
        c->c2p[1] = sv[0];
        return;
    }
    if (pipe(c->p2c) < 0 || pipe(c->c2p) < 0) die("pipe");
    if (strcmp(transport, "pipe1m") == 0) {
        set_pipe_size(c->p2c[1], 1 << 20);
        set_pipe_size(c->c2p[1], 1 << 20);
    } else if (strcmp(transport, "pipe") != 0) {
        fprintf(stderr, "ceiling: unknown transport %s\n", transport);
        exit(2);
    }
}

static int is_unix(const char *t) { return strcmp(t, "unix") == 0; }

/* Close the ends the given side does not use. */
static void chan_keep(const char *t, chan_t *c, int child) {
    if (is_unix(t)) {
        close(child ? c->p2c[1] : c->p2c[0]);
        return;
    }
    if (child) {
        close(c->p2c[1]);
        close(c->c2p[0]);
    } else {
        close(c->p2c[0]);
        close(c->c2p[1]);
    }
}

/* sync pipe: child -> parent single bytes ("ready", "done") */
static int sync_fd[2];

static void sync_send(void) {
    char b = 'x';
    write_all(sync_fd[1], &b, 1);
}

static void sync_wait(void) {
    char b;
    read_all(sync_fd[0], &b, 1);
}

static int wait_child(pid_t pid) {
    int st;
    while (waitpid(pid, &st, 0) < 0) {
        if (errno != EINTR) die("waitpid");
    }
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* ---- modes ----------------------------------------------------------- */

/* Writes `count` frames of `size` bytes (header and payload from `frame`). */
static void write_frames(int wfd, const unsigned char *frame, size_t size, long count) {
    if (size <= SMALL_FRAME) {
        for (long i = 0; i < count; i++) write_all(wfd, frame, size + 8);
    } else {
        for (long i = 0; i < count; i++) {
            write_all(wfd, frame, 8);
            write_all(wfd, frame + 8, size);
        }
    }
}

static int mode_stream(const char *t, size_t size, long count, long warm) {
    chan_t c;
    make_chan(t, &c);
    if (pipe(sync_fd) < 0) die("pipe");
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
        chan_keep(t, &c, 1);
        close(sync_fd[0]);
        reader_t r;
        reader_init(&r, c.p2c[0]);
        unsigned char *msg = NULL;
        size_t cap = 0;
        unsigned long long total = 0;
        sync_send();
        if (warm > 0) {
            for (long i = 0; i < warm; i++) total += reader_frame(&r, &msg, &cap);
            sync_send();
        }
        for (long i = 0; i < count; i++) total += reader_frame(&r, &msg, &cap);
        if (total != (unsigned long long)size * (unsigned long long)(count + warm)) {
            fprintf(stderr, "ceiling: got %llu bytes\n", total);
            _exit(3);
        }
        sync_send();
        _exit(0);
    }
    chan_keep(t, &c, 0);
    close(sync_fd[1]);
    int wfd = c.p2c[1];
    unsigned char *frame = malloc(size + 8);
    if (!frame) die("malloc");
    memset(frame + 8, 0x5a, size);
    put_be64(frame, size);
    sync_wait();
    if (warm > 0) {
        /* Untimed: the child's message buffer is faulted in by these. */
        write_frames(wfd, frame, size, warm);
        sync_wait();
    }
    double t0 = now_s();
    write_frames(wfd, frame, size, count);
    sync_wait();
    double dt = now_s() - t0;
    int rc = wait_child(pid);
    if (rc != 0) {
        fprintf(stderr, "ceiling: child exit %d\n", rc);
        return 1;
    }
    printf("{\"ok\": true, \"mode\": \"stream\", \"transport\": \"%s\", "
           "\"size\": %zu, \"count\": %ld, \"metrics\": {\"seconds\": %.9f, "
           "\"msgs_per_s\": %.3f, \"mb_per_s\": %.3f}}\n",
           t, size, count, dt, count / dt, (double)size * count / dt / 1e6);
    return 0;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int mode_pingpong(const char *t, size_t size, long count, long warm) {
    chan_t c;
    make_chan(t, &c);
    if (pipe(sync_fd) < 0) die("pipe");
    pid_t pid = fork();
    if (pid < 0) die("fork");
    unsigned char *frame = malloc(size + 8);
    if (!frame) die("malloc");
    memset(frame + 8, 0x5a, size);
    put_be64(frame, size);
    if (pid == 0) {
        chan_keep(t, &c, 1);
        close(sync_fd[0]);
        reader_t r;
        reader_init(&r, c.p2c[0]);
        unsigned char *msg = NULL;
        size_t cap = 0;
        sync_send();
        for (long i = 0; i < count + warm; i++) {
            size_t n = reader_frame(&r, &msg, &cap);
            put_be64(frame, n);
            memcpy(frame + 8, msg, n);
            write_all(c.c2p[1], frame, n + 8);
        }
        sync_send();
        _exit(0);
    }
    chan_keep(t, &c, 0);
    close(sync_fd[1]);
    reader_t r;
    reader_init(&r, c.c2p[0]);
    unsigned char *msg = NULL;
    size_t cap = 0;
    uint64_t *samples = malloc(sizeof(uint64_t) * (count > 0 ? count : 1));
    if (!samples) die("malloc");
    sync_wait();
    for (long i = 0; i < warm + count; i++) {
        uint64_t t0 = now_ns();
        write_all(c.p2c[1], frame, size + 8);
        reader_frame(&r, &msg, &cap);
        if (i >= warm) samples[i - warm] = now_ns() - t0;
    }
    sync_wait();
    int rc = wait_child(pid);
    if (rc != 0) return 1;
    qsort(samples, count, sizeof(uint64_t), cmp_u64);
    long p99 = (long)(count * 0.99);
    if (p99 >= count) p99 = count - 1;
    printf("{\"ok\": true, \"mode\": \"pingpong\", \"transport\": \"%s\", "
           "\"size\": %zu, \"count\": %ld, \"metrics\": {\"rtt_median_us\": "
           "%.3f, \"rtt_p99_us\": %.3f, \"rtt_min_us\": %.3f}}\n",
           t, size, count, samples[count / 2] / 1e3, samples[p99] / 1e3,
           samples[0] / 1e3);
    return 0;
}

static int mode_spawn(long count, long warm) {
    double *s = malloc(sizeof(double) * (count > 0 ? count : 1));
    if (!s) die("malloc");
    for (long i = 0; i < warm + count; i++) {
        double t0 = now_s();
        pid_t pid = fork();
        if (pid < 0) die("fork");
        if (pid == 0) _exit(0);
        if (wait_child(pid) != 0) return 1;
        if (i >= warm) s[i - warm] = now_s() - t0;
    }
    /* insertion sort is fine for a few hundred samples */
    for (long i = 1; i < count; i++) {
        double v = s[i];
        long j = i - 1;
        while (j >= 0 && s[j] > v) {
            s[j + 1] = s[j];
            j--;
        }
        s[j + 1] = v;
    }
    printf("{\"ok\": true, \"mode\": \"spawn\", \"count\": %ld, \"metrics\": "
           "{\"spawn_ms\": %.4f, \"spawn_min_ms\": %.4f}}\n",
           count, s[count / 2] * 1e3, s[0] * 1e3);
    return 0;
}

static void usage(void) {
    fprintf(stderr,
            "usage: ceiling stream   pipe|pipe1m|unix SIZE COUNT [WARMUP]\n"
            "       ceiling pingpong pipe|pipe1m|unix SIZE COUNT WARMUP\n"
            "       ceiling spawn    COUNT WARMUP\n");
    exit(2);
}

int main(int argc, char **argv) {
    if (argc < 2) usage();
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (strcmp(argv[1], "stream") == 0 && (argc == 5 || argc == 6))
        return mode_stream(argv[2], strtoull(argv[3], NULL, 10),
                           atol(argv[4]), argc == 6 ? atol(argv[5]) : 0);
    if (strcmp(argv[1], "pingpong") == 0 && argc == 6)
        return mode_pingpong(argv[2], strtoull(argv[3], NULL, 10),
                             atol(argv[4]), atol(argv[5]));
    if (strcmp(argv[1], "spawn") == 0 && argc == 4)
        return mode_spawn(atol(argv[2]), atol(argv[3]));
    usage();
    return 2;
}
