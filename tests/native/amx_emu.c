/* amx_emu: run Intel AMX code on an x86-64 CPU without AMX, for tests.
 *
 * Preloaded (LD_PRELOAD) into a process, it catches the SIGILL that a CPU without AMX raises at
 * each AMX instruction, decodes the instruction and carries it out in software on tile registers
 * kept per thread, then resumes after it. It also answers the kernel's AMX permission request
 * (arch_prctl ARCH_REQ_XCOMP_PERM), which fails on such a CPU and would keep llama.cpp from
 * registering its AMX buffer type.
 *
 * Covered: LDTILECFG, STTILECFG, TILERELEASE, TILEZERO, TILELOADD, TILELOADDT1, TILESTORED,
 * TDPBSSD/TDPBSUD/TDPBUSD/TDPBUUD (AMX-INT8) and TDPBF16PS (AMX-BF16), with the checks the Intel
 * SDM lists for them: an invalid tile configuration is a #GP (delivered as SIGSEGV, as the
 * kernel does), a tile used while not configured or with shapes that do not fit is a #UD
 * (SIGILL). Each fault is described on stderr first, so a crashing AMX kernel says why.
 *
 * On a CPU that has AMX nothing is installed: the real instructions run.
 * AMX_EMU_STATS=1 prints how many instructions of each kind ran, at exit, to stderr.
 * AMX_EMU_FAULT=1 makes every int8 dot product one too large (a broken kernel, for tests).
 *
 * Build: cc -O2 -shared -fPIC -o libamx_emu.so amx_emu.c -ldl
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

struct tiles {
    int configured;
    uint8_t palette;
    uint8_t start_row;
    uint16_t colsb[8];
    uint8_t rows[8];
    uint8_t data[8][16][64];
};

/* initial-exec: no allocation on first use in a signal handler; right for a preloaded library
   (loaded at start-up), not for one opened later with dlopen. */
static __thread struct tiles T __attribute__((tls_model("initial-exec")));

enum { LDTILECFG, STTILECFG, TILERELEASE, TILEZERO, TILELOADD, TILESTORED, TDP_INT8, TDP_BF16, N_OPS };
static const char *const OP_NAMES[N_OPS] = {
    "ldtilecfg", "sttilecfg", "tilerelease", "tilezero", "tileloadd", "tilestored", "tdpb*d", "tdpbf16ps",
};
static unsigned long counts[N_OPS];
/* AMX_EMU_FAULT=1 adds one to every int8 dot product: a wrong AMX kernel, for a test to show that
   the emulated results are the ones a model's output is made of. */
static int32_t fault_offset;

/* x86 register number (ModRM/SIB encoding) -> glibc's gregs index. */
static const int GREG[16] = {
    REG_RAX, REG_RCX, REG_RDX, REG_RBX, REG_RSP, REG_RBP, REG_RSI, REG_RDI,
    REG_R8,  REG_R9,  REG_R10, REG_R11, REG_R12, REG_R13, REG_R14, REG_R15,
};

static void say(const char *fmt, ...) {
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (n > (int)sizeof line - 2) n = sizeof line - 2;
    line[n++] = '\n';
    ssize_t ignored = write(2, line, n);
    (void)ignored;
}

/* A #UD: the instruction is left in place and SIGILL restored, so the CPU raises it again and
   the process ends as it would on real hardware. */
static void undefined(const char *why, int tile) {
    say("amx_emu: #UD (SIGILL): %s (tmm%d)", why, tile);
    signal(SIGILL, SIG_DFL);
}

/* A #GP: the kernel sends SIGSEGV for it. */
static void general_protection(const char *why) {
    say("amx_emu: #GP (SIGSEGV): %s", why);
    signal(SIGSEGV, SIG_DFL);
    sigset_t segv;
    sigemptyset(&segv);
    sigaddset(&segv, SIGSEGV);
    sigprocmask(SIG_UNBLOCK, &segv, NULL);
    raise(SIGSEGV);
    _exit(128 + SIGSEGV); /* not reached */
}

struct operand {
    int is_reg;
    int reg;         /* ModRM.rm register when is_reg */
    uint8_t *addr;   /* base + displacement (memory) */
    long stride;     /* index * scale (sibmem); 0 without an index */
    int has_sib;
};

/* Decode ModRM (+SIB, displacement) at p; returns the bytes read. */
static int decode_rm(const uint8_t *p, int rex_x, int rex_b, const greg_t *g, struct operand *op,
                     int *rip_relative) {
    uint8_t modrm = p[0];
    int mod = modrm >> 6, rm = modrm & 7, n = 1;
    memset(op, 0, sizeof *op);
    *rip_relative = 0;
    if (mod == 3) {
        op->is_reg = 1;
        op->reg = rm | (rex_b << 3);
        return n;
    }
    int64_t base = 0, disp = 0;
    if (rm == 4) {
        uint8_t sib = p[n++];
        int scale = 1 << (sib >> 6), index = ((sib >> 3) & 7) | (rex_x << 3), b = (sib & 7) | (rex_b << 3);
        op->has_sib = 1;
        if (index != 4) op->stride = (long)g[GREG[index]] * scale;
        if ((b & 7) == 5 && mod == 0) {
            disp = *(const int32_t *)(p + n);
            n += 4;
        } else {
            base = g[GREG[b]];
        }
    } else if (rm == 5 && mod == 0) {
        *rip_relative = 1;
        disp = *(const int32_t *)(p + n);
        n += 4;
    } else {
        base = g[GREG[rm | (rex_b << 3)]];
    }
    if (mod == 1) {
        disp = *(const int8_t *)(p + n);
        n += 1;
    } else if (mod == 2) {
        disp = *(const int32_t *)(p + n);
        n += 4;
    }
    op->addr = (uint8_t *)(intptr_t)(base + disp);
    return n;
}

static int tile_ok(int t, const char *what) {
    if (!T.configured) {
        undefined("tiles not configured", t);
        return 0;
    }
    if (t > 7 || T.rows[t] == 0 || T.colsb[t] == 0) {
        char why[96];
        snprintf(why, sizeof why, "%s on a tile that is not configured (rows %d, bytes per row %d)", what,
                 t > 7 ? 0 : T.rows[t], t > 7 ? 0 : T.colsb[t]);
        undefined(why, t);
        return 0;
    }
    return 1;
}

static int load_config(const uint8_t *m) {
    uint8_t palette = m[0];
    if (palette == 0) {
        memset(&T, 0, sizeof T);
        return 1;
    }
    if (palette != 1) {
        general_protection("ldtilecfg: palette other than 0 or 1");
        return 0;
    }
    for (int i = 2; i < 16; i++)
        if (m[i]) return general_protection("ldtilecfg: reserved bytes 2-15 not zero"), 0;
    for (int i = 32; i < 48; i++)
        if (m[i]) return general_protection("ldtilecfg: reserved bytes 32-47 not zero"), 0;
    for (int i = 56; i < 64; i++)
        if (m[i]) return general_protection("ldtilecfg: reserved bytes 56-63 not zero"), 0;
    for (int t = 0; t < 8; t++) {
        uint16_t colsb = (uint16_t)(m[16 + 2 * t] | (m[17 + 2 * t] << 8));
        uint8_t rows = m[48 + t];
        if (rows > 16 || colsb > 64)
            return general_protection("ldtilecfg: a tile larger than 16 rows x 64 bytes"), 0;
        if ((rows == 0) != (colsb == 0))
            return general_protection("ldtilecfg: a tile with rows but no bytes per row, or the reverse"), 0;
        T.rows[t] = rows;
        T.colsb[t] = colsb;
    }
    T.palette = 1;
    T.start_row = m[1];
    memset(T.data, 0, sizeof T.data);
    T.configured = 1;
    return 1;
}

static void store_config(uint8_t *m) {
    memset(m, 0, 64);
    if (!T.configured) return;
    m[0] = T.palette;
    m[1] = T.start_row;
    for (int t = 0; t < 8; t++) {
        m[16 + 2 * t] = T.colsb[t] & 0xff;
        m[17 + 2 * t] = T.colsb[t] >> 8;
        m[48 + t] = T.rows[t];
    }
}

static void zero_tile(int t) { memset(T.data[t], 0, sizeof T.data[t]); }

static void tile_load(int t, const struct operand *op) {
    uint8_t rows = T.rows[t];
    uint16_t colsb = T.colsb[t];
    for (int r = 0; r < 16; r++) {
        memset(T.data[t][r], 0, 64);
        if (r < rows) memcpy(T.data[t][r], op->addr + (long)r * op->stride, colsb);
    }
    T.start_row = 0;
}

static void tile_store(int t, const struct operand *op) {
    for (int r = 0; r < T.rows[t]; r++) memcpy(op->addr + (long)r * op->stride, T.data[t][r], T.colsb[t]);
    T.start_row = 0;
}

static float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    if ((u & 0x7f800000u) == 0) u &= 0x80000000u; /* DAZ */
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static float flush(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7f800000u) == 0) u &= 0x80000000u; /* FTZ */
    memcpy(&f, &u, 4);
    return f;
}

/* dst += src1 . src2 as the SDM's pseudocode: src1 is rows x K dwords, src2 is K rows of
   dst-width dwords (each dword four bytes, or two bf16). */
static int dot_product(int dst, int a, int b, int kind, const char *name) {
    if (!tile_ok(dst, name) || !tile_ok(a, name) || !tile_ok(b, name)) return 0;
    if (dst == a || dst == b || a == b) return undefined("the same tile twice in a dot product", dst), 0;
    int m_rows = T.rows[dst], n_cols = T.colsb[dst] / 4, k_dwords = T.colsb[a] / 4;
    if (T.colsb[dst] % 4 || T.colsb[a] % 4 || T.rows[a] != m_rows || T.rows[b] != k_dwords ||
        T.colsb[b] != T.colsb[dst])
        return undefined("tile shapes that do not fit the dot product", dst), 0;
    for (int m = 0; m < m_rows; m++) {
        for (int n = 0; n < n_cols; n++) {
            if (kind == 4) {
                float acc;
                memcpy(&acc, &T.data[dst][m][4 * n], 4);
                for (int k = 0; k < k_dwords; k++) {
                    uint16_t a0, a1, b0, b1;
                    memcpy(&a0, &T.data[a][m][4 * k], 2);
                    memcpy(&a1, &T.data[a][m][4 * k + 2], 2);
                    memcpy(&b0, &T.data[b][k][4 * n], 2);
                    memcpy(&b1, &T.data[b][k][4 * n + 2], 2);
                    acc = flush(acc + bf16_to_f32(a0) * bf16_to_f32(b0));
                    acc = flush(acc + bf16_to_f32(a1) * bf16_to_f32(b1));
                }
                memcpy(&T.data[dst][m][4 * n], &acc, 4);
            } else {
                int32_t acc;
                memcpy(&acc, &T.data[dst][m][4 * n], 4);
                uint32_t sum = (uint32_t)acc;
                for (int k = 0; k < k_dwords; k++) {
                    for (int i = 0; i < 4; i++) {
                        uint8_t x = T.data[a][m][4 * k + i], y = T.data[b][k][4 * n + i];
                        int32_t xv = (kind == 0 || kind == 1) ? (int8_t)x : x; /* ss, su: A signed */
                        int32_t yv = (kind == 0 || kind == 2) ? (int8_t)y : y; /* ss, us: B signed */
                        sum += (uint32_t)(xv * yv);
                    }
                }
                acc = (int32_t)sum + fault_offset; /* 0 unless AMX_EMU_FAULT (tests of the tests) */
                memcpy(&T.data[dst][m][4 * n], &acc, 4);
            }
        }
        memset(&T.data[dst][m][T.colsb[dst]], 0, 64 - T.colsb[dst]);
    }
    for (int m = m_rows; m < 16; m++) memset(T.data[dst][m], 0, 64);
    T.start_row = 0;
    return 1;
}

static struct sigaction previous_sigill;

/* Not an AMX instruction: give SIGILL back to whoever had it (the default: the end of the
   process) and return; the instruction faults again and the kernel delivers it to them, with
   their own flags and mask. */
static void pass_on(int sig, siginfo_t *info, void *ctx) {
    (void)sig, (void)info, (void)ctx;
    sigaction(SIGILL, &previous_sigill, NULL);
}

static void on_sigill(int sig, siginfo_t *info, void *ctx) {
    ucontext_t *uc = ctx;
    greg_t *g = uc->uc_mcontext.gregs;
    const uint8_t *p = (const uint8_t *)g[REG_RIP];
    if (info->si_code <= 0) { /* sent by kill/raise: no instruction to carry out */
        pass_on(sig, info, ctx);
        raise(SIGILL);
        return;
    }
    if (p[0] != 0xC4 || (p[1] & 0x1f) != 2) return pass_on(sig, info, ctx); /* VEX3, map 0F38 */
    int rex_r = !(p[1] & 0x80), rex_x = !(p[1] & 0x40), rex_b = !(p[1] & 0x20);
    int w = p[2] >> 7, vvvv = (~p[2] >> 3) & 0xf, l = (p[2] >> 2) & 1, pp = p[2] & 3;
    uint8_t opcode = p[3];
    if (w || l) return pass_on(sig, info, ctx);
    int reg = ((p[4] >> 3) & 7) | (rex_r << 3);
    struct operand op;
    int rip_relative;
    int length = 4 + decode_rm(p + 4, rex_x, rex_b, g, &op, &rip_relative);
    if (rip_relative) op.addr += (intptr_t)(p + length);
    int ok = 1;
    if ((opcode == 0x49 || opcode == 0x4B) && vvvv != 0) return pass_on(sig, info, ctx); /* VEX.vvvv must be 1111b */
    switch (opcode) {
    case 0x49:
        if (pp == 0 && !op.is_reg && reg == 0) {
            __atomic_add_fetch(&counts[LDTILECFG], 1, __ATOMIC_RELAXED);
            ok = load_config(op.addr);
        } else if (pp == 1 && !op.is_reg && reg == 0) {
            __atomic_add_fetch(&counts[STTILECFG], 1, __ATOMIC_RELAXED);
            store_config(op.addr);
        } else if (pp == 0 && op.is_reg && p[4] == 0xC0) {
            __atomic_add_fetch(&counts[TILERELEASE], 1, __ATOMIC_RELAXED);
            memset(&T, 0, sizeof T);
        } else if (pp == 3 && op.is_reg && op.reg == 0) {
            __atomic_add_fetch(&counts[TILEZERO], 1, __ATOMIC_RELAXED);
            ok = tile_ok(reg, "tilezero");
            if (ok) zero_tile(reg);
        } else {
            return pass_on(sig, info, ctx);
        }
        break;
    case 0x4B:
        if (op.is_reg || !op.has_sib) return pass_on(sig, info, ctx);
        if (pp == 3 || pp == 1) {
            __atomic_add_fetch(&counts[TILELOADD], 1, __ATOMIC_RELAXED);
            ok = tile_ok(reg, "tileloadd");
            if (ok) tile_load(reg, &op);
        } else if (pp == 2) {
            __atomic_add_fetch(&counts[TILESTORED], 1, __ATOMIC_RELAXED);
            ok = tile_ok(reg, "tilestored");
            if (ok) tile_store(reg, &op);
        } else {
            return pass_on(sig, info, ctx);
        }
        break;
    case 0x5E: /* pp: 3 ss, 2 su, 1 us, 0 uu */
        if (!op.is_reg) return pass_on(sig, info, ctx);
        __atomic_add_fetch(&counts[TDP_INT8], 1, __ATOMIC_RELAXED);
        ok = dot_product(reg, op.reg, vvvv, pp == 3 ? 0 : pp == 2 ? 1 : pp == 1 ? 2 : 3, "tdpb*d");
        break;
    case 0x5C:
        if (!op.is_reg || pp != 2) return pass_on(sig, info, ctx);
        __atomic_add_fetch(&counts[TDP_BF16], 1, __ATOMIC_RELAXED);
        ok = dot_product(reg, op.reg, vvvv, 4, "tdpbf16ps");
        break;
    default:
        return pass_on(sig, info, ctx);
    }
    if (ok) g[REG_RIP] += length;
}

static int cpu_has_amx(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return (d >> 24) & 1; /* AMX-TILE */
}

static int emulating;
static void take_sigill(void);

/* glibc's syscall(), as llama.cpp calls it to ask for the AMX state permission. */
long syscall(long number, ...) {
    va_list ap;
    va_start(ap, number);
    long a1 = va_arg(ap, long), a2 = va_arg(ap, long), a3 = va_arg(ap, long);
    long a4 = va_arg(ap, long), a5 = va_arg(ap, long), a6 = va_arg(ap, long);
    va_end(ap);
    if (emulating && number == SYS_arch_prctl && a1 == ARCH_REQ_XCOMP_PERM && a2 == XFEATURE_XTILEDATA) {
        take_sigill(); /* again: the interpreter may have set its own (faulthandler) since */
        return 0;
    }
    static long (*real)(long, ...);
    if (!real) real = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
    return real(number, a1, a2, a3, a4, a5, a6);
}

static void print_counts(void) {
    char line[256];
    int n = snprintf(line, sizeof line, "amx_emu: %s", emulating ? "emulated" : "native AMX, not emulated");
    for (int i = 0; i < N_OPS && emulating && n < (int)sizeof line; i++)
        n += snprintf(line + n, sizeof line - n, " %s=%lu", OP_NAMES[i], counts[i]);
    say("%s", line);
}

/* Put the SIGILL handler in place unless it is there; whatever was there is called for the
   SIGILLs that are not AMX instructions. */
static void take_sigill(void) {
    struct sigaction now;
    if (sigaction(SIGILL, NULL, &now) == 0 && (now.sa_flags & SA_SIGINFO) && now.sa_sigaction == on_sigill)
        return;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigill;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGILL, &sa, &previous_sigill);
}

__attribute__((constructor)) static void install(void) {
    emulating = !cpu_has_amx();
    if (emulating) take_sigill();
    const char *fault = getenv("AMX_EMU_FAULT");
    fault_offset = fault && *fault && *fault != '0';
    const char *stats = getenv("AMX_EMU_STATS");
    if (stats && *stats && *stats != '0') atexit(print_counts);
}
