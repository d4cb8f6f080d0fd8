/* The 1.67bit-lut format (TL2-style lookup tables): portable parts shared by every ISA.
 *
 * Layout (see bittern/pack.py for the reference): columns are padded to Kp, a multiple of 24, and read
 * as triples (3 consecutive columns). A triple of codes (c0, c1, c2) has the base-3 value
 * v = 9 (c0+1) + 3 (c1+1) + (c2+1); when v < 13 it is stored negated (v -> 26 - v, sign bit 1), so
 * idx = v - 13 in 0..13 always has its first nonzero code positive. 4 + 1 bits per 3 weights.
 * Every row owns row_bytes = 5 Kp / 24 + 2 bytes; rows come in groups of 32:
 *   full group (32 rows): per 24-column block, 160 bytes: four 32-byte index vectors (vector k, byte r:
 *     idx of triple 2k of row r in the low nibble, triple 2k+1 in the high nibble) then eight 32-bit
 *     sign words (word j: the sign of triple j of row r is bit (r >> 2) of byte (r & 3)); after all
 *     blocks, 32 int16 (little-endian) per-row counts of negated triples. Full groups 2p and 2p+1 share
 *     their 64 rows' bytes: blocks interleaved (block b of 2p, block b of 2p+1, ...), then the counts of
 *     2p and of 2p+1, so the GEMV reads the pair as one stream; an unpaired last full group is alone.
 *   last group (N mod 32 rows): row after row, per block 4 index bytes (byte k as above for one row)
 *     and 1 sign byte (bit j: triple j), then the row's int16 count of negated triples.
 * The SIMD GEMV looks up per-triple tables of the 14 partial sums of the activations (int16 split into
 * a low-byte and a high-byte 16-entry table); a negated triple flips both bytes (xor 0xff), which gives
 * -v - 1, and the per-row count adds the 1s back. The portable functions here compute the same numbers
 * from the codes. */
#include "bt_internal.h"

/* codes (c0, c1, c2) of canonical index i */
static const int8_t LUT_CODES[14][3] = {{0, 0, 0},  {0, 0, 1},  {0, 1, -1}, {0, 1, 0},  {0, 1, 1},
                                        {1, -1, -1}, {1, -1, 0}, {1, -1, 1}, {1, 0, -1}, {1, 0, 0},
                                        {1, 0, 1},  {1, 1, -1}, {1, 1, 0},  {1, 1, 1}};

int64_t bt_lut_row_bytes(int64_t Kp) { return 5 * Kp / 24 + 2; }

const uint8_t *bt_lut_group_ptr(const bt_mm *a, int64_t g) { return a->w + g * BT_LUT_ROWS * a->row_bytes; }

/* full groups 2p and 2p + 1 share one region (all but a last full group of odd index) */
static inline int lut_paired(const bt_mm *a, int64_t g) { return g < a->N / BT_LUT_ROWS / 2 * 2; }

const uint8_t *bt_lut_block0(const bt_mm *a, int64_t g) {
    return lut_paired(a, g) ? bt_lut_group_ptr(a, g & ~(int64_t)1) + 160 * (g & 1) : bt_lut_group_ptr(a, g);
}

int64_t bt_lut_block_stride(const bt_mm *a, int64_t g) { return lut_paired(a, g) ? 320 : 160; }

const uint8_t *bt_lut_counts(const bt_mm *a, int64_t g) {
    const int64_t nb = a->Kp / BT_BLOCK_LUT;
    return lut_paired(a, g) ? bt_lut_group_ptr(a, g & ~(int64_t)1) + 320 * nb + 64 * (g & 1)
                            : bt_lut_group_ptr(a, g) + 160 * nb;
}

/* (index, sign) of triple j of row n */
static inline void lut_triple(const bt_mm *a, int64_t n, int64_t j, int *idx, int *neg) {
    const int64_t g = n / BT_LUT_ROWS, r = n % BT_LUT_ROWS, b = j / 8, jj = j % 8;
    const int64_t full = a->N / BT_LUT_ROWS;
    const uint8_t *p = bt_lut_group_ptr(a, g);
    if (g < full) {
        const uint8_t *blk = bt_lut_block0(a, g) + bt_lut_block_stride(a, g) * b;
        *idx = (blk[32 * (jj / 2) + r] >> (4 * (jj & 1))) & 15;
        *neg = (blk[128 + 4 * jj + (r & 3)] >> (r >> 2)) & 1;
    } else {
        const uint8_t *blk = p + r * a->row_bytes + 5 * b;
        *idx = (blk[jj / 2] >> (4 * (jj & 1))) & 15;
        *neg = (blk[4] >> jj) & 1;
    }
}

/* the 3 stored codes + 1 (in {0, 1, 2}) of (index, sign), little-endian in the low 3 bytes */
static uint32_t g_decode_word[2][16];
/* 6 decoded bytes of a pair of triples: key = index byte | sign of the first << 8 | sign of the second << 9 */
static uint64_t g_decode_pair[1024];
static void init_decode_words(void) {
    for (int s = 0; s < 2; s++)
        for (int i = 0; i < 16; i++) {
            uint32_t w = 0;
            for (int c = 0; c < 3; c++) {
                int code = i < 14 ? LUT_CODES[i][c] : 0;
                if (s) code = -code;
                w |= (uint32_t)(code + 1) << (8 * c);
            }
            g_decode_word[s][i] = w;
        }
    for (int key = 0; key < 1024; key++)
        g_decode_pair[key] = (uint64_t)g_decode_word[(key >> 8) & 1][key & 15] |
                             (uint64_t)g_decode_word[(key >> 9) & 1][(key >> 4) & 15] << 24;
}
__attribute__((constructor)) static void bt_lut_init(void) { init_decode_words(); }

/* 8x8 bit matrix transpose: bit 8 j + i <-> bit 8 i + j */
static inline uint64_t transpose8x8(uint64_t x) {
    uint64_t t;
    t = (x ^ (x >> 7)) & 0x00AA00AA00AA00AAULL;
    x = x ^ t ^ (t << 7);
    t = (x ^ (x >> 14)) & 0x0000CCCC0000CCCCULL;
    x = x ^ t ^ (t << 14);
    t = (x ^ (x >> 28)) & 0x00000000F0F0F0F0ULL;
    return x ^ t ^ (t << 28);
}

/* 24 decoded bytes (codes + 1) of one row and block from its 4 index bytes u and 8 sign bits s */
static inline void decode_row_block(uint32_t u, unsigned s, uint8_t out[32]) {
    for (int k = 0; k < 4; k++) {
        const uint64_t v = g_decode_pair[((u >> (8 * k)) & 0xff) | (((s >> (2 * k)) & 3) << 8)];
        memcpy(out + 6 * k, &v, 8);
    }
}

int32_t bt_lut_neg_count(const bt_mm *a, int64_t n) {
    const int64_t g = n / BT_LUT_ROWS, r = n % BT_LUT_ROWS, nb = a->Kp / 24;
    const uint8_t *p = bt_lut_group_ptr(a, g);
    const uint8_t *c = g < a->N / BT_LUT_ROWS ? bt_lut_counts(a, g) + 2 * r : p + r * a->row_bytes + 5 * nb;
    return (int16_t)(uint16_t)(c[0] | (c[1] << 8));
}

/* Exactly what the table kernels compute, for any stored bytes: a negated triple contributes -v - 1
 * (indices 14 and 15 have the value 0) and the stored count is added. For valid data that is the dot
 * product of the codes with q. */
int32_t bt_lut_dot_row(const bt_mm *a, int64_t n, const int8_t *q) {
    int32_t acc = bt_lut_neg_count(a, n);
    for (int64_t j = 0; j < a->Kp / 3; j++) {
        int idx, neg;
        lut_triple(a, n, j, &idx, &neg);
        const int v = idx > 13 ? 0 : LUT_CODES[idx][0] * q[3 * j] + LUT_CODES[idx][1] * q[3 * j + 1] + LUT_CODES[idx][2] * q[3 * j + 2];
        acc += neg ? -v - 1 : v;
    }
    return acc;
}

void bt_lut_gemv_scalar(const bt_mm *a, int64_t row0, int64_t row1) {
    for (int64_t t = 0; t < a->T; t++) {
        const int8_t *q = a->q + t * a->ldq;
        for (int64_t n = row0; n < row1 && n < a->N; n++) bt_store(a, t, n, bt_lut_dot_row(a, n, q) + a->rowsum[t]);
    }
}

/* Portable block decoder: the 32 rows of a full group's 160-byte block to codes + 1, row r at tmp + 32 r
 * (24 bytes). One lookup per pair of triples; the sign words are regrouped per row with four 8x8 bit
 * transposes. */
void bt_lut_decode_block(const uint8_t *blk, uint8_t *tmp) {
    uint8_t sbyte[BT_LUT_ROWS];
    for (int k = 0; k < 4; k++) { /* byte k of the 8 sign words -> sign bytes of rows 4 i + k */
        uint64_t x = 0;
        for (int j = 0; j < 8; j++) x |= (uint64_t)blk[128 + 4 * j + k] << (8 * j);
        x = transpose8x8(x);
        for (int i = 0; i < 8; i++) sbyte[4 * i + k] = (uint8_t)(x >> (8 * i));
    }
    for (int r = 0; r < BT_LUT_ROWS; r++) {
        const uint32_t u = (uint32_t)blk[r] | (uint32_t)blk[32 + r] << 8 | (uint32_t)blk[64 + r] << 16 |
                           (uint32_t)blk[96 + r] << 24;
        decode_row_block(u, sbyte[r], tmp + 32 * r);
    }
}

/* Decoded rows of `width` bytes (codes + 1, zero codes after Kp), row-major, or (pairs) the AVX2 panel:
 * rows 2p and 2p+1 alternate 32-byte slices and a lone last row stands alone (see dslot in bt_avx2.c).
 * A whole full group at an even panel row goes through k's group decoder when it has one; other full
 * groups through its block decoder (or the portable one), a block at a time, and rows are copied out. */
void bt_lut_decode(const bt_mm *a, int64_t row0, int64_t nrows, uint8_t *dst, int64_t width, int pairs,
                   const bt_kernels *k) {
    const int64_t nb = a->Kp / BT_BLOCK_LUT, full = a->N / BT_LUT_ROWS;
    uint8_t tmp[BT_LUT_ROWS * 32 + 8];
    void (*block)(const uint8_t *, uint8_t *) = k->lut_decode_block ? k->lut_decode_block : bt_lut_decode_block;
    for (int64_t r = 0; r < nrows;) {
        const int64_t n = row0 + r, g = n / BT_LUT_ROWS;
        const int64_t gend = g < full ? (g + 1) * BT_LUT_ROWS : a->N; /* rows of this group */
        const int64_t rows_here = gend - n < nrows - r ? gend - n : nrows - r;
        const uint8_t *gp = bt_lut_group_ptr(a, g);
        /* (a lone last panel row is never inside a whole group at an even row: 32 rows from r even end at
         * an odd row) */
        const int whole = pairs && k->lut_decode_group && g < full && rows_here == BT_LUT_ROWS && !(r & 1);
        if (whole) k->lut_decode_group(bt_lut_block0(a, g), bt_lut_block_stride(a, g), nb, dst + r * width, width);
        for (int64_t b = 0; b < nb && !whole; b++) {
            if (g < full) block(bt_lut_block0(a, g) + bt_lut_block_stride(a, g) * b, tmp);
            for (int64_t i = 0; i < rows_here; i++) {
                const int64_t rr = n + i - g * BT_LUT_ROWS; /* row within the group */
                const uint8_t *src = tmp + 32 * rr;
                if (g >= full) { /* short last group: row after row */
                    const uint8_t *rb = gp + rr * a->row_bytes + 5 * b;
                    const uint32_t u = (uint32_t)rb[0] | (uint32_t)rb[1] << 8 | (uint32_t)rb[2] << 16 | (uint32_t)rb[3] << 24;
                    decode_row_block(u, rb[4], tmp);
                    src = tmp;
                }
                const int64_t row = r + i;
                const int alone = !pairs || ((nrows & 1) && row == nrows - 1);
                uint8_t *base = alone ? dst + row * width : dst + (row >> 1) * 2 * width + 32 * (row & 1);
                const int64_t sst = alone ? 32 : 64;
                for (int c = 0; c < 3; c++) { /* 8-byte pieces never cross a 32-column slice */
                    const int64_t k = 24 * b + 8 * c;
                    memcpy(base + (k >> 5) * sst + (k & 31), src + 8 * c, 8);
                }
            }
        }
        for (int64_t i = 0; i < rows_here; i++) {
            const int64_t row = r + i;
            const int alone = !pairs || ((nrows & 1) && row == nrows - 1);
            uint8_t *base = alone ? dst + row * width : dst + (row >> 1) * 2 * width + 32 * (row & 1);
            const int64_t sst = alone ? 32 : 64;
            for (int64_t k = a->Kp; k < width; k++) base[(k >> 5) * sst + (k & 31)] = 1; /* code 0 */
        }
        r += rows_here;
    }
}
