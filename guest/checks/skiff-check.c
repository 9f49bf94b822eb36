/*
 * skiff-check: guest user-mode checks that skiff's integration tests run inside the
 * default guest (built statically by scripts/fetch-guest into the guest's /bin).
 *
 *   skiff-check vec-info          what user mode sees: CPUID vector bits, OSXSAVE, XCR0
 *   skiff-check vec-regs SEED N   fill every vector register XCR0 enables (XMM, YMM, or
 *                                 ZMM0-31 and k0-7) with a pattern derived from SEED,
 *                                 then N times: yield the CPU and spin with them live,
 *                                 and compare every register against the pattern
 *   skiff-check vec-libc SEED N   N rounds of strlen, strnlen, memchr, memrchr, memcmp,
 *                                 strcmp, strchr, strrchr, memcpy, memmove and memset
 *                                 on buffers whose answers a byte loop computes
 *   skiff-check stress PROCS PAR  runs PROCS processes (forks, every 32nd also an
 *                                 exec of itself), PAR at a time, alternating vec-regs
 *                                 and vec-libc, and counts those that gave a wrong
 *                                 result or died by a signal
 *   skiff-check syscall-jump ADDR user-mode jumps to the kernel's syscall entry ADDR
 *                                 (LSTAR) made to look like a half-done syscall: each
 *                                 must end in SIGSEGV at ADDR, as on hardware
 *   skiff-check randread DEV N    N reads of 4 KiB at random 4 KiB-aligned offsets of
 *                                 block device DEV with O_DIRECT, one at a time (for
 *                                 bench/disk.py); prints the count and microseconds
 *
 * Each prints one "skiff-check: ok ..." line and exits 0, or "skiff-check: FAIL ..."
 * lines and exits 1. Compiled with -mgeneral-regs-only, so the only vector code that
 * runs is the inline assembly below and the C library's.
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#include <fcntl.h>
#include <time.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t xcr0(void)
{
    unsigned a, b, c, d;
    __cpuid(1, a, b, c, d);
    if (!(c & (1u << 27))) /* CPUID.1:ECX.OSXSAVE clear: xgetbv would raise #UD */
        return 0;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

static int quiet; /* children of `stress` print only failures */

enum { XMM = 1, YMM = 2, ZMM = 3 };

/* The widest register class user mode may use: XCR0 must enable its state. */
static int widest_class(void)
{
    uint64_t x = xcr0();
    if ((x & 0xe6) == 0xe6)
        return ZMM;
    if ((x & 0x6) == 0x6)
        return YMM;
    return XMM;
}

static int info(void)
{
    unsigned a, b, c, d, b7 = 0, c7 = 0, d7 = 0;
    __cpuid(1, a, b, c, d);
    unsigned c1 = c, d1 = d;
    if (__get_cpuid_max(0, 0) >= 7)
        __cpuid_count(7, 0, a, b7, c7, d7);
    static const char *names[] = {"", "xmm", "ymm", "zmm"};
    printf("skiff-check: info sse2=%u avx=%u osxsave=%u avx2=%u avx512f=%u xcr0=%#llx class=%s\n",
           (d1 >> 26) & 1, (c1 >> 28) & 1, (c1 >> 27) & 1, (b7 >> 5) & 1, (b7 >> 16) & 1,
           (unsigned long long)xcr0(), names[widest_class()]);
    return 0;
}

#define LANES 8 /* a 64-byte register as 8 quadwords */
static uint64_t want[32][LANES] __attribute__((aligned(64)));
static uint64_t got[32][LANES] __attribute__((aligned(64)));
static uint64_t want_k[8], got_k[8];

#define ALL16(m) m(0) m(1) m(2) m(3) m(4) m(5) m(6) m(7) m(8) m(9) m(10) m(11) m(12) m(13) m(14) m(15)
#define HI16(m) m(16) m(17) m(18) m(19) m(20) m(21) m(22) m(23) m(24) m(25) m(26) m(27) m(28) m(29) m(30) m(31)
#define K8(m) m(0) m(1) m(2) m(3) m(4) m(5) m(6) m(7)
#define LD_X(n) "movdqu " #n "*64(%0), %%xmm" #n "\n\t"
#define ST_X(n) "movdqu %%xmm" #n ", " #n "*64(%1)\n\t"
#define LD_Y(n) "vmovdqu " #n "*64(%0), %%ymm" #n "\n\t"
#define ST_Y(n) "vmovdqu %%ymm" #n ", " #n "*64(%1)\n\t"
#define LD_Z(n) "vmovdqu64 " #n "*64(%0), %%zmm" #n "\n\t"
#define ST_Z(n) "vmovdqu64 %%zmm" #n ", " #n "*64(%1)\n\t"
#define LD_K(n) "kmovq " #n "*8(%2), %%k" #n "\n\t"
#define ST_K(n) "kmovq %%k" #n ", " #n "*8(%3)\n\t"
/* sched_yield (rax, rcx, r11 clobbered), then a register-only loop of r4 rounds. */
#define YIELD_AND_SPIN \
    "mov $24, %%eax\n\tsyscall\n\t" \
    "mov %4, %%r9\n1:\tdec %%r9\n\tjnz 1b\n\t"

/* Load the pattern, yield and spin with it live, store what the registers hold. */
static void cycle(int cls, unsigned long spin)
{
#define OPERANDS : : "r"(want), "r"(got), "r"(want_k), "r"(got_k), "r"(spin) : "memory", "rax", "rcx", "r11", "r9"
    if (cls == XMM)
        __asm__ volatile(ALL16(LD_X) YIELD_AND_SPIN ALL16(ST_X) OPERANDS);
    else if (cls == YMM)
        __asm__ volatile(ALL16(LD_Y) YIELD_AND_SPIN ALL16(ST_Y) "vzeroupper\n\t" OPERANDS);
    else
        __asm__ volatile(ALL16(LD_Z) HI16(LD_Z) K8(LD_K) YIELD_AND_SPIN ALL16(ST_Z) HI16(ST_Z) K8(ST_K)
                         "vzeroupper\n\t" OPERANDS);
#undef OPERANDS
}

static int regs(unsigned seed, long rounds)
{
    int cls = widest_class();
    int nregs = cls == ZMM ? 32 : 16, width = cls == ZMM ? 8 : cls == YMM ? 4 : 2;
    for (int r = 0; r < 32; r++)
        for (int q = 0; q < LANES; q++)
            want[r][q] = q < width ? 0x5a00000000000000ull ^ ((uint64_t)seed << 24) ^ ((uint64_t)r << 8) ^ q : 0;
    for (int k = 0; k < 8; k++)
        want_k[k] = 0xa500000000000000ull ^ ((uint64_t)seed << 16) ^ k;
    for (long i = 0; i < rounds; i++) {
        memset(got, 0, sizeof got);
        memset(got_k, 0, sizeof got_k);
        cycle(cls, 20000 + (seed % 7) * 5000);
        for (int r = 0; r < nregs; r++)
            for (int q = 0; q < width; q++)
                if (got[r][q] != want[r][q]) {
                    printf("skiff-check: FAIL regs seed %u round %ld: register %d quadword %d is %#llx, want %#llx\n",
                           seed, i, r, q, (unsigned long long)got[r][q], (unsigned long long)want[r][q]);
                    return 1;
                }
        for (int k = 0; cls == ZMM && k < 8; k++)
            if (got_k[k] != want_k[k]) {
                printf("skiff-check: FAIL regs seed %u round %ld: k%d is %#llx, want %#llx\n", seed, i, k,
                       (unsigned long long)got_k[k], (unsigned long long)want_k[k]);
                return 1;
            }
    }
    if (!quiet)
        printf("skiff-check: ok regs seed %u rounds %ld class %s\n", seed, rounds, cls == ZMM ? "zmm" : cls == YMM ? "ymm" : "xmm");
    return 0;
}

/* Byte-loop answers (compiled without vector code) to check the library against. */
static long ref_chr(const char *s, size_t n, int c) { for (size_t i = 0; i < n; i++) if ((unsigned char)s[i] == c) return (long)i; return -1; }
static long ref_rchr(const char *s, size_t n, int c) { for (size_t i = n; i-- > 0;) if ((unsigned char)s[i] == c) return (long)i; return -1; }
static int sign(int x) { return (x > 0) - (x < 0); }

#define BUF 4096
static char a[BUF + 64] __attribute__((aligned(64))), b[BUF + 64] __attribute__((aligned(64)));
static char c[BUF + 64] __attribute__((aligned(64)));

#define CHECK(cond, ...) do { if (!(cond)) { printf("skiff-check: FAIL libc seed %u round %ld: ", seed, i); \
    printf(__VA_ARGS__); printf("\n"); return 1; } } while (0)

static int libc(unsigned seed, long rounds)
{
    uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
    for (long i = 0; i < rounds; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        size_t len = x % BUF, off = (x >> 12) % 64, off2 = (x >> 18) % 64;
        for (size_t j = 0; j < len; j++)
            a[off + j] = (char)('A' + (j * 7 + seed) % 50);
        a[off + len] = 0;
        char *s = a + off;
        CHECK(strlen(s) == len, "strlen %zu, want %zu", strlen(s), len);
        CHECK(strnlen(s, len / 2) == len / 2, "strnlen");
        int ch = 'A' + (int)((x >> 24) % 50);
        long want_chr = ref_chr(s, len, ch), want_rchr = ref_rchr(s, len, ch);
        char *p = memchr(s, ch, len);
        CHECK((p ? p - s : -1) == want_chr, "memchr %ld, want %ld", p ? (long)(p - s) : -1L, want_chr);
        p = memrchr(s, ch, len);
        CHECK((p ? p - s : -1) == want_rchr, "memrchr %ld, want %ld", p ? (long)(p - s) : -1L, want_rchr);
        p = strchr(s, ch);
        CHECK((p ? p - s : -1) == want_chr, "strchr %ld, want %ld", p ? (long)(p - s) : -1L, want_chr);
        p = strrchr(s, ch);
        CHECK((p ? p - s : -1) == want_rchr, "strrchr %ld, want %ld", p ? (long)(p - s) : -1L, want_rchr);
        char *d = b + off2;
        memcpy(d, s, len + 1);
        CHECK(memcmp(d, s, len + 1) == 0 && strcmp(d, s) == 0, "memcpy/memcmp/strcmp equal");
        if (len > 0) {
            size_t at = (x >> 30) % len;
            d[at] ^= 0x20;
            int want_sign = sign((unsigned char)d[at] - (unsigned char)s[at]);
            CHECK(sign(memcmp(d, s, len)) == want_sign, "memcmp differs at %zu: sign %d, want %d", at,
                  sign(memcmp(d, s, len)), want_sign);
            CHECK(sign(strcmp(d, s)) == want_sign, "strcmp differs at %zu", at);
            d[at] ^= 0x20;
        }
        memset(c, 'z', len);
        for (size_t j = 0; j < len; j++)
            CHECK(c[j] == 'z', "memset byte %zu", j);
        memmove(a + off + 1, a + off, len); /* overlapping: shift right by one */
        for (size_t j = 1; j <= len; j++)
            CHECK(a[off + j] == (char)('A' + ((j - 1) * 7 + seed) % 50), "memmove byte %zu", j);
    }
    if (!quiet)
        printf("skiff-check: ok libc seed %u rounds %ld\n", seed, rounds);
    return 0;
}

/* --- stress: many processes, each checked by its parent ----------------------------- */


/* Child n runs vec-regs (even n) or vec-libc (odd n). Every 32nd child execs the
 * program afresh (a new address space, loaded from the ELF); the rest are forks, which
 * cost the guest kernel far less where its work is emulated (an exec costs seconds
 * there). */
static pid_t spawn(long n)
{
    int regs_check = n % 2 == 0;
    int rounds = regs_check ? 4 : 40;
    fflush(stdout); /* a child must not inherit (and print again) unwritten output */
    pid_t pid = fork();
    if (pid != 0)
        return pid;
    quiet = 1;
    if (n % 32 == 31) {
        char seed[24], count[24];
        snprintf(seed, sizeof seed, "%ld", n);
        snprintf(count, sizeof count, "%d", rounds);
        char *argv[] = {"skiff-check", regs_check ? "vec-regs" : "vec-libc", seed, count, "quiet", 0};
        execv("/proc/self/exe", argv);
        _exit(127);
    }
    int failed = regs_check ? regs((unsigned)n, rounds) : libc((unsigned)n, rounds);
    fflush(stdout);
    _exit(failed);
}

static int stress(long procs, long par)
{
    long started = 0, done = 0, killed = 0, wrong = 0, other = 0;
    if (par < 1)
        par = 1;
    while (done < procs) {
        while (started < procs && started - done < par) {
            if (spawn(started) < 0) {
                printf("skiff-check: FAIL stress: fork failed after %ld processes\n", started);
                return 1;
            }
            started++;
        }
        int status;
        pid_t pid = wait(&status);
        if (pid < 0)
            break;
        done++;
        if (WIFSIGNALED(status)) {
            killed++;
            printf("skiff-check: FAIL stress: process %d killed by signal %d (%s)\n", pid, WTERMSIG(status),
                   strsignal(WTERMSIG(status)));
        } else if (WEXITSTATUS(status) == 1) {
            wrong++;
        } else if (WEXITSTATUS(status) != 0) {
            other++;
            printf("skiff-check: FAIL stress: process %d exited with status %d\n", pid, WEXITSTATUS(status));
        }
    }
    printf("skiff-check: %s stress processes %ld killed %ld wrong %ld other %ld\n",
           killed + wrong + other || done != procs ? "FAIL" : "ok", done, killed, wrong, other);
    return killed + wrong + other || done != procs;
}

/* --- syscall-jump: the SYSCALL fix-up must not be a way into the kernel ------------- */

static sigjmp_buf segv_jump;
static void *volatile segv_addr;

static void on_segv(int sig, siginfo_t *si, void *uc)
{
    (void)sig, (void)uc;
    segv_addr = si->si_addr;
    siglongjmp(segv_jump, 1);
}

/* Jumps to `entry` with RCX, R11 and RAX set as a SYSCALL sets them (RCX after a
 * `syscall` instruction when `after_syscall`, else after a `nop`). Returns 0 and sets
 * `*flags` if execution came back to RCX (the kernel ran it as a system call), or 1
 * if it faulted (`segv_addr` says where). */
static int jump_to(unsigned long entry, unsigned long r11, int after_syscall, unsigned long *flags)
{
    if (sigsetjmp(segv_jump, 1))
        return 1;
    if (after_syscall)
        __asm__ volatile("lea 2f(%%rip), %%rcx\n\tmov %2, %%r11\n\tmov $39, %%eax\n\tjmp *%1\n\t"
                         ".byte 0x0f, 0x05\n2:\tpushfq\n\tpop %0\n\t"
                         : "=r"(*flags) : "r"(entry), "r"(r11) : "rax", "rcx", "r11", "memory");
    else
        __asm__ volatile("lea 2f(%%rip), %%rcx\n\tmov %2, %%r11\n\tmov $39, %%eax\n\tjmp *%1\n\t"
                         "nop\n\tnop\n2:\tpushfq\n\tpop %0\n\t"
                         : "=r"(*flags) : "r"(entry), "r"(r11) : "rax", "rcx", "r11", "memory");
    return 0;
}

static int syscall_jump(unsigned long entry)
{
    struct sigaction sa = {0};
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &sa, 0);
    unsigned long real;
    __asm__ volatile("pushfq\n\tpop %0" : "=r"(real));
    struct { const char *what; unsigned long r11; int after_syscall; } cases[] = {
        {"R11 with IOPL 3 after a syscall instruction", real | 0x3000, 1},
        {"R11 with IOPL 3, TF and AC after a syscall instruction", real | 0x3000 | 0x100 | 0x40000, 1},
        {"the real RFLAGS in R11, RCX not after a syscall instruction", real, 0},
    };
    int failed = 0;
    for (unsigned i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        unsigned long flags = 0;
        segv_addr = 0;
        if (jump_to(entry, cases[i].r11, cases[i].after_syscall, &flags) == 0) {
            printf("skiff-check: FAIL syscall-jump (%s): the kernel ran it as a system call and "
                   "returned with RFLAGS %#lx (IOPL %lu)\n", cases[i].what, flags, (flags >> 12) & 3);
            failed = 1;
        } else if ((unsigned long)segv_addr != entry) {
            printf("skiff-check: FAIL syscall-jump (%s): SIGSEGV at %p, want %#lx\n", cases[i].what, segv_addr, entry);
            failed = 1;
        }
    }
    if (!failed)
        printf("skiff-check: ok syscall-jump %zu cases, each SIGSEGV at %#lx\n", sizeof cases / sizeof cases[0], entry);
    return failed;
}

static int randread(const char *dev, long n)
{
    int fd = open(dev, O_RDONLY | O_DIRECT);
    off_t end = fd < 0 ? -1 : lseek(fd, 0, SEEK_END);
    unsigned long long bytes = end > 0 ? (unsigned long long)end : 0;
    if (bytes < 4096) {
        printf("skiff-check: FAIL randread cannot open or size %s\n", dev);
        return 1;
    }
    void *buf;
    if (posix_memalign(&buf, 4096, 4096) != 0)
        return 1;
    unsigned long long blocks = bytes / 4096, x = 0x9e3779b97f4a7c15ull;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        if (pread(fd, buf, 4096, (off_t)((x % blocks) * 4096)) != 4096) {
            printf("skiff-check: FAIL randread read %ld\n", i);
            return 1;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    long us = (b.tv_sec - a.tv_sec) * 1000000L + (b.tv_nsec - a.tv_nsec) / 1000;
    printf("skiff-check: ok randread %ld reads in %ld us\n", n, us);
    return 0;
}

int main(int argc, char **argv)
{
    quiet = argc == 5 && !strcmp(argv[4], "quiet");
    if (argc == 2 && !strcmp(argv[1], "vec-info"))
        return info();
    if ((argc == 4 || quiet) && !strcmp(argv[1], "vec-regs"))
        return regs((unsigned)strtoul(argv[2], 0, 0), strtol(argv[3], 0, 0));
    if ((argc == 4 || quiet) && !strcmp(argv[1], "vec-libc"))
        return libc((unsigned)strtoul(argv[2], 0, 0), strtol(argv[3], 0, 0));
    if (argc == 4 && !strcmp(argv[1], "stress"))
        return stress(strtol(argv[2], 0, 0), strtol(argv[3], 0, 0));
    if (argc == 4 && !strcmp(argv[1], "randread"))
        return randread(argv[2], strtol(argv[3], 0, 0));
    if (argc == 3 && !strcmp(argv[1], "syscall-jump"))
        return syscall_jump(strtoul(argv[2], 0, 16));
    fprintf(stderr, "usage: skiff-check vec-info | vec-regs SEED N | vec-libc SEED N | stress PROCS PAR | "
                    "syscall-jump LSTAR_HEX\n");
    return 2;
}
