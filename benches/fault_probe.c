/*
 * fault_probe.c -- what faulting in a fresh 64 MiB buffer costs on this
 * machine, with small pages and with transparent huge pages, no Python.
 *
 *   fault_probe MIB ROUNDS PAUSE_S
 *
 * Each round pauses PAUSE_S seconds, then maps MIB MiB of fresh anonymous
 * memory, writes one byte per 4 KiB page (2 MiB block by block, each block
 * timed) and unmaps it: once with small pages (MADV_NOHUGEPAGE), once with
 * the huge-page hint (MADV_HUGEPAGE), then once more with the hint right
 * after the previous unmap (memory freed a moment ago).  Prints one line per
 * buffer: total ms, the slowest 2 MiB block, how many blocks took > 1 ms,
 * and what the munmap took.
 *
 * On a VM with free page reporting (page_reporting.page_reporting_order=9),
 * free 2 MiB blocks go back to the host ~2 s after they were freed; a huge
 * page faulted in on one of them costs milliseconds instead of ~0.2 ms.
 *
 * Build: cc -O2 -o fault_probe fault_probe.c
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define BLOCK (2UL << 20)

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void one(const char *what, size_t len, int advice) {
    char *raw = mmap(NULL, len + BLOCK, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    /* 2 MiB aligned, so that every block can be one huge page. */
    char *p = (char *)(((unsigned long)raw + BLOCK - 1) & ~(BLOCK - 1));
    madvise(p, len, advice);
    double total = 0, worst = 0;
    int slow = 0;
    for (size_t b = 0; b < len; b += BLOCK) {
        double t0 = now_s();
        for (size_t i = 0; i < BLOCK; i += 4096) p[b + i] = 1;
        double dt = now_s() - t0;
        total += dt;
        if (dt > worst) worst = dt;
        if (dt > 1e-3) slow++;
    }
    double t0 = now_s();
    munmap(raw, len + BLOCK);
    double unmap = now_s() - t0;
    printf("  %-22s %7.1f ms  slowest block %5.2f ms  blocks > 1 ms: %2d/%zu"
           "  munmap %.2f ms\n", what, total * 1e3, worst * 1e3, slow,
           len / BLOCK, unmap * 1e3);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: fault_probe MIB ROUNDS PAUSE_S\n");
        return 2;
    }
    size_t len = (size_t)atol(argv[1]) << 20;
    int rounds = atoi(argv[2]);
    double pause_s = atof(argv[3]);
    for (int r = 0; r < rounds; r++) {
        printf("round %d (after a %.1f s pause):\n", r + 1, pause_s);
        usleep((useconds_t)(pause_s * 1e6));
        one("small pages", len, MADV_NOHUGEPAGE);
        usleep((useconds_t)(pause_s * 1e6));
        one("huge pages", len, MADV_HUGEPAGE);
        one("huge pages, again", len, MADV_HUGEPAGE);
    }
    return 0;
}
