/* AMX instructions against plain C loops: tests/native/amx_emu.c's arithmetic (or the CPU's, on
 * an AMX machine). Exit 0 when every product matches; prints the first mismatch otherwise.
 *
 *   amx_selftest            the dot products (int8 in its four signednesses, bf16), loads, stores
 *   amx_selftest badconfig  ldtilecfg with a reserved byte set (a #GP: SIGSEGV)
 *   amx_selftest unconfigured   tileloadd on a tile with no rows (a #UD: SIGILL)
 *
 * Build: cc -O1 -mamx-tile -mamx-int8 -mamx-bf16 -o amx_selftest amx_selftest.c
 * The configuration is loaded with its 64 bytes declared (see edge_af3/llama_amx.py for why).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

struct config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

static void load_config(const struct config *c) {
    __asm__ volatile("ldtilecfg %0" : : "m"(*(const unsigned char(*)[64])c));
}

#define LOAD(t, base, stride) \
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t : : "r"(base), "r"((long)(stride)) : "memory")
#define STORE(t, base, stride) \
    __asm__ volatile("tilestored %%tmm" #t ", (%0,%1,1)" : : "r"(base), "r"((long)(stride)) : "memory")

static uint32_t lcg = 12345;
static uint8_t next_byte(void) { return (uint8_t)((lcg = lcg * 1103515245u + 12345u) >> 16); }

static float bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* A: 16 rows x 64 bytes, B: 16 rows (K dwords) x 64 bytes, C: 16 x 16 int32/float. */
static uint8_t A[16][64], B[16][64];
static int32_t C[16][16], want[16][16];
static float Cf[16][16], wantf[16][16];

static int check_int8(int kind, const char *name) {
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 64; j++) A[i][j] = next_byte(), B[i][j] = next_byte();
    for (int m = 0; m < 16; m++)
        for (int n = 0; n < 16; n++) {
            C[m][n] = (int32_t)(next_byte() * 1000) - 100000;
            int64_t acc = C[m][n];
            for (int k = 0; k < 16; k++)
                for (int i = 0; i < 4; i++) {
                    int a = (kind == 0 || kind == 1) ? (int8_t)A[m][4 * k + i] : A[m][4 * k + i];
                    int b = (kind == 0 || kind == 2) ? (int8_t)B[k][4 * n + i] : B[k][4 * n + i];
                    acc += a * b;
                }
            want[m][n] = (int32_t)acc;
        }
    LOAD(0, C, 64);
    LOAD(1, A, 64);
    LOAD(2, B, 64);
    switch (kind) {
    case 0: __asm__ volatile("tdpbssd %%tmm2, %%tmm1, %%tmm0" ::); break;
    case 1: __asm__ volatile("tdpbsud %%tmm2, %%tmm1, %%tmm0" ::); break;
    case 2: __asm__ volatile("tdpbusd %%tmm2, %%tmm1, %%tmm0" ::); break;
    default: __asm__ volatile("tdpbuud %%tmm2, %%tmm1, %%tmm0" ::); break;
    }
    int32_t got[16][16];
    STORE(0, got, 64);
    for (int m = 0; m < 16; m++)
        for (int n = 0; n < 16; n++)
            if (got[m][n] != want[m][n]) {
                printf("%s: C[%d][%d] = %d, want %d\n", name, m, n, got[m][n], want[m][n]);
                return 1;
            }
    return 0;
}

static int check_bf16(void) {
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 32; j++) {
            /* small values with exact products: mantissas of 3 bits, exponents near 1 */
            uint16_t a = (uint16_t)(0x3f80 | ((next_byte() & 7) << 4) | ((next_byte() & 1) << 15));
            uint16_t b = (uint16_t)(0x3f80 | ((next_byte() & 7) << 4) | ((next_byte() & 1) << 15));
            memcpy(&A[i][2 * j], &a, 2);
            memcpy(&B[i][2 * j], &b, 2);
        }
    for (int m = 0; m < 16; m++)
        for (int n = 0; n < 16; n++) {
            Cf[m][n] = (float)(next_byte() % 16);
            double acc = Cf[m][n];
            for (int k = 0; k < 16; k++)
                for (int i = 0; i < 2; i++) {
                    uint16_t a, b;
                    memcpy(&a, &A[m][4 * k + 2 * i], 2);
                    memcpy(&b, &B[k][4 * n + 2 * i], 2);
                    acc += (double)bf16(a) * bf16(b);
                }
            wantf[m][n] = (float)acc;
        }
    LOAD(0, Cf, 64);
    LOAD(1, A, 64);
    LOAD(2, B, 64);
    __asm__ volatile("tdpbf16ps %%tmm2, %%tmm1, %%tmm0" ::);
    float got[16][16];
    STORE(0, got, 64);
    for (int m = 0; m < 16; m++)
        for (int n = 0; n < 16; n++)
            if (got[m][n] != wantf[m][n]) {
                printf("tdpbf16ps: C[%d][%d] = %g, want %g\n", m, n, got[m][n], wantf[m][n]);
                return 1;
            }
    return 0;
}

/* Rows and widths smaller than the registers: a load takes rows x colsb bytes at the stride and
   zeroes the rest; a store writes back no more. */
static int check_shapes(void) {
    struct config c = {0};
    c.palette = 1;
    c.rows[3] = 5;
    c.colsb[3] = 12;
    load_config(&c);
    uint8_t src[5 * 40], dst[5 * 40];
    for (int i = 0; i < (int)sizeof src; i++) src[i] = next_byte();
    memset(dst, 0xAB, sizeof dst);
    LOAD(3, src, 40);
    STORE(3, dst, 40);
    for (int r = 0; r < 5; r++)
        for (int j = 0; j < 40; j++) {
            uint8_t want_byte = j < 12 ? src[r * 40 + j] : 0xAB;
            if (dst[r * 40 + j] != want_byte) {
                printf("shapes: byte %d of row %d is %d, want %d\n", j, r, dst[r * 40 + j], want_byte);
                return 1;
            }
        }
    return 0;
}

int main(int argc, char **argv) {
    if (syscall(SYS_arch_prctl, 0x1023, 18)) {
        printf("the AMX permission request failed\n");
        return 2;
    }
    struct config c = {0};
    c.palette = 1;
    for (int t = 0; t < 3; t++) c.rows[t] = 16, c.colsb[t] = 64;
    if (argc > 1 && !strcmp(argv[1], "badconfig")) {
        c.reserved[3] = 1;
        load_config(&c);
        printf("ldtilecfg took a configuration with a reserved byte set\n");
        return 3;
    }
    if (argc > 1 && !strcmp(argv[1], "unconfigured")) {
        load_config(&c);
        LOAD(5, A, 64);
        printf("tileloadd ran on a tile with no rows\n");
        return 3;
    }
    load_config(&c);
    static const char *names[4] = {"tdpbssd", "tdpbsud", "tdpbusd", "tdpbuud"};
    for (int kind = 0; kind < 4; kind++)
        if (check_int8(kind, names[kind])) return 1;
    if (check_bf16()) return 1;
    if (check_shapes()) return 1;
    __asm__ volatile("tilerelease" ::);
    printf("ok\n");
    return 0;
}
