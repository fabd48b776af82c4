/* kernels_int8.c - the int8-activation kernels (vnni: the default where the CPU has it; avx2-int8): the
 * activations quantized once per matmul, then integer dot products with q8_0, q4_0 and llama2.c
 * int8 weights, on AVX2 (maddubs/madd) and on AVX512-VNNI (vpdpbusd). Apart from the float kernels
 * because they compute other numbers (activation rounding) and own a per-thread quantization buffer,
 * which ARM's int8 path (neon-dotprod, kernels_neon.c) shares with them.
 *
 * The activation vector is quantized once per matmul to blocks of 32 int8 with one float scale
 * (amax / 127, rounded to nearest), like ggml's q8_0; each 32-column block is then an
 * exact integer dot product, scaled by weight scale x activation scale. The only new error is the
 * activation rounding: at most half a step (amax_b / 254) per value, so a block moves by at most
 * sum_j |w_j| * amax_b / 254 (tests/test_kernels.py checks that bound).
 *
 * Signed x signed bytes: vpdpbusd and maddubs take one unsigned operand, so |w| and sign(w) * x
 * are multiplied (sign transfer). q4_0 nibbles are already unsigned (0..15): they multiply x
 * directly and the offset of 8 comes off as 8 * d_x * sum(q_x) per block, precomputed with the
 * quantization. maddubs sums pairs into int16: 2 * 128 * 127 and 2 * 15 * 127 cannot saturate. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "kernels_simd.h"

#ifdef TL_INT8

/* Whether the int8 paths take this matrix: whole 32-column blocks, int8 groups of whole blocks. */
int tl_int8_fits(const tl_matrix *w) {
    if (w->cols % TL_QK) return 0;
    if (w->type == TL_TYPE_Q8) return w->group_size % TL_QK == 0 && w->cols % w->group_size == 0;
    return w->type == TL_TYPE_Q8_0 || w->type == TL_TYPE_Q4_0;
}

/* Two buffers per thread, freed when the thread exits (a server may run each request on a new
 * thread): the activations (a matmul quantizes on its caller; the workers only read them) and the
 * weight rows vnni's batched tile unpacks (on each worker). */
enum { SCRATCH_ACTIVATIONS, SCRATCH_WEIGHTS, N_SCRATCH };

typedef struct {
    void *data[N_SCRATCH];
    size_t bytes[N_SCRATCH];
} quant_buffer;

static pthread_key_t quant_key;
static pthread_once_t quant_key_once = PTHREAD_ONCE_INIT;

static void quant_buffer_free(void *p) {
    quant_buffer *buf = p;
    for (int i = 0; i < N_SCRATCH; i++) free(buf->data[i]);
    free(buf);
}

static void quant_key_create(void) { pthread_key_create(&quant_key, quant_buffer_free); }

/* This thread's buffer `which`, at least bytes long (64-byte aligned); NULL if out of memory. */
static void *quant_scratch(int which, size_t bytes) {
    pthread_once(&quant_key_once, quant_key_create);
    quant_buffer *buf = pthread_getspecific(quant_key);
    if (buf == NULL) {
        buf = calloc(1, sizeof(*buf));
        if (buf == NULL || pthread_setspecific(quant_key, buf) != 0) {
            free(buf);
            return NULL;
        }
    }
    if (bytes > buf->bytes[which]) {
        void *grown = NULL;
        if (posix_memalign(&grown, 64, bytes) != 0) return NULL;
        free(buf->data[which]);
        buf->data[which] = grown;
        buf->bytes[which] = bytes;
    }
    return buf->data[which];
}

#ifdef TL_X86
static void quantize_blocks_avx2(int8_t *q, float *d, float *dsum, const float *x, size_t blocks);
#endif

/* The row-major blocks again for vnni's batched tile (tl_quant_x says the layout): a copy of 4 bytes
 * per token and 4 columns, n x cols bytes per matmul against n x rows x cols multiply-adds. */
static void lay_out_groups(int8_t *qt, int32_t *sumt, float *dt, const int8_t *q, const int32_t *isum, const float *d,
                           int n, int nb) {
    const int groups = (n + 15) / 16;
    memset(qt, 0, (size_t)groups * nb * 512);
    memset(sumt, 0, (size_t)groups * nb * 16 * sizeof(int32_t));
    memset(dt, 0, (size_t)groups * nb * 16 * sizeof(float));
    for (int t = 0; t < n; t++) {
        const int g = t / 16, l = t % 16;
        for (int b = 0; b < nb; b++) {
            const int8_t *src = q + ((size_t)t * nb + b) * TL_QK;
            const size_t gb = (size_t)g * nb + b;
            for (int c = 0; c < 8; c++) memcpy(qt + (gb * 8 + c) * 64 + 4 * l, src + 4 * c, 4);
            sumt[gb * 16 + l] = -isum[(size_t)t * nb + b];
            dt[gb * 16 + l] = d[(size_t)t * nb + b];
        }
    }
}

int tl_quantize_x(tl_quant_x *xq, const float *x, int n, int cols, int tiled) {
    const int nb = cols / TL_QK;
    const size_t blocks = (size_t)n * nb;
    const int groups = tiled && n >= TL_VNNI_TILE_MIN_TOKENS ? (n + 15) / 16 : 0;
    const size_t group_blocks = (size_t)groups * nb;
    /* scales, scaled and integer sums, tile sums and scales, then the two copies of the values (64-byte
     * aligned) */
    const size_t head = (blocks * 3 + group_blocks * 32) * sizeof(float);
    const size_t head_aligned = (head + 63) & ~(size_t)63;
    float *d = quant_scratch(SCRATCH_ACTIVATIONS, head_aligned + group_blocks * 512 + (size_t)n * cols);
    if (d == NULL) return 0; /* the float path then */
    float *dsum = d + blocks;
    int32_t *isum = (int32_t *)(dsum + blocks);
    int32_t *sumt = isum + blocks;
    float *dt = (float *)(sumt + group_blocks * 16);
    int8_t *qt = (int8_t *)d + head_aligned;
    int8_t *q = qt + group_blocks * 512;
#ifdef TL_X86
    quantize_blocks_avx2(q, d, dsum, x, blocks);
#else
    tl_quantize_blocks_neon(q, d, dsum, x, blocks);
#endif
    for (size_t b = 0; b < blocks; b++) {
        int sum = 0;
        for (int j = 0; j < TL_QK; j++) sum += q[b * TL_QK + j];
        isum[b] = sum;
    }
    *xq = (tl_quant_x){q, d, dsum, isum, nb, NULL, NULL, NULL, 0};
    if (groups > 0) {
        lay_out_groups(qt, sumt, dt, q, isum, d, n, nb);
        xq->qt = qt, xq->sumt = sumt, xq->dt = dt, xq->groups = groups;
    }
    return 1;
}
#endif /* TL_INT8 */

#ifdef TL_X86

TL_TARGET_BEGIN("avx2,fma,f16c")

ALWAYS_INLINE float hmax_256(__m256 v) {
    v = _mm256_max_ps(v, _mm256_permute2f128_ps(v, v, 1));
    v = _mm256_max_ps(v, _mm256_shuffle_ps(v, v, 0x4E));
    v = _mm256_max_ps(v, _mm256_shuffle_ps(v, v, 0xB1));
    return _mm256_cvtss_f32(v);
}

/* Each block of 32: scale amax / 127, values x * (127 / amax) rounded to nearest even (|q| <= 127). */
static void quantize_blocks_avx2(int8_t *q, float *d, float *dsum, const float *x, size_t blocks) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (size_t b = 0; b < blocks; b++, x += TL_QK, q += TL_QK) {
        __m256 v[4];
        for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(x + 8 * i);
        const __m256 amax01 = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1]));
        const __m256 amax23 = _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]));
        const float amax = hmax_256(_mm256_max_ps(amax01, amax23));
        const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        __m256i iv[4];
        for (int i = 0; i < 4; i++) iv[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
        /* packs work within 128-bit lanes: the permute puts the 4-value groups back in order */
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
        _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(iv[0], iv[1]), _mm256_add_epi32(iv[2], iv[3]));
        d[b] = amax / 127.0f;
        dsum[b] = d[b] * hsum_256(_mm256_cvtepi32_ps(sum));
    }
}

/* Block b of a row as 32 bytes in column order: signed values (q8_0, int8), or q4_0's unsigned
 * nibbles (low nibbles are columns 0..15, high nibbles 16..31). */
ALWAYS_INLINE __m256i wblock_i8(int type, const unsigned char *row, int b) {
    if (type == TL_TYPE_Q8) return _mm256_loadu_si256((const __m256i *)(row + (size_t)b * TL_QK));
    if (type == TL_TYPE_Q8_0) return _mm256_loadu_si256((const __m256i *)(row + (size_t)b * TL_Q8_0_BLOCK_BYTES + 2));
    const __m128i q = _mm_loadu_si128((const __m128i *)(row + (size_t)b * TL_Q4_0_BLOCK_BYTES + 2));
    const __m128i low = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low), _mm_and_si128(q, low));
}

ALWAYS_INLINE size_t wblock_bytes_i8(int type) {
    return type == TL_TYPE_Q8 ? TL_QK : type == TL_TYPE_Q8_0 ? TL_Q8_0_BLOCK_BYTES : TL_Q4_0_BLOCK_BYTES;
}

/* 8 int32 partial sums of the 32 products w[j] * x[j] (maddubs pairs, then madd with ones). */
ALWAYS_INLINE __m256i dot32_avx2(int type, __m256i wq, __m256i xq) {
    const __m256i pairs = type == TL_TYPE_Q4_0
                              ? _mm256_maddubs_epi16(wq, xq)
                              : _mm256_maddubs_epi16(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(xq, wq));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

/* out[(t0 + t) * os + r + i] = row r + i of W . token t0 + t of xq, for R rows x T tokens: each
 * weight block is loaded once for the T tokens (16 ymm registers: 4 rows x 2 tokens of accumulators). */
ALWAYS_INLINE void tile_i8_avx2(int type, int R, int T, const tl_matrix *w, int r, const tl_quant_x *xq, int t0,
                               float *out, size_t os) {
    const size_t stride = row_bytes(w), block_bytes = wblock_bytes_i8(type);
    const int nb = xq->blocks;
    const unsigned char *row[4];
    __m256 acc[4][2];
    float offset[4][2]; /* q4_0: sum over blocks of d_w * d_x * sum(q_x), taken 8 times off the end */
    for (int i = 0; i < R; i++) {
        row[i] = (const unsigned char *)w->data + (size_t)(r + i) * stride;
        for (int t = 0; t < T; t++) {
            acc[i][t] = _mm256_setzero_ps();
            offset[i][t] = 0.0f;
        }
    }
    const int blocks_per_scale = type == TL_TYPE_Q8 ? w->group_size / TL_QK : 1;
    for (int g = 0, b = 0; b < nb; g++) {
        float dw[4];
        for (int i = 0; i < R; i++) dw[i] = block_scale(type, w, row[i], r + i, g);
        for (const int end = b + blocks_per_scale; b < end; b++) {
            __m256i xv[2];
            float dx[2];
            for (int t = 0; t < T; t++) {
                const size_t tb = (size_t)(t0 + t) * nb + b;
                xv[t] = _mm256_loadu_si256((const __m256i *)(xq->q + tb * TL_QK));
                dx[t] = xq->d[tb];
            }
            for (int i = 0; i < R; i++) {
                _mm_prefetch((const char *)row[i] + (size_t)b * block_bytes + PREFETCH_BYTES, _MM_HINT_T0);
                const __m256i wv = wblock_i8(type, row[i], b);
                for (int t = 0; t < T; t++) {
                    const __m256i dot = dot32_avx2(type, wv, xv[t]);
                    acc[i][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw[i] * dx[t]), acc[i][t]);
                    if (type == TL_TYPE_Q4_0) offset[i][t] += dw[i] * xq->dsum[(size_t)(t0 + t) * nb + b];
                }
            }
        }
    }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < T; t++) out[(size_t)(t0 + t) * os + r + i] = hsum_256(acc[i][t]) - 8.0f * offset[i][t];
}

/* Rows [r0, r1) for every token, 4 rows x 2 tokens at a time (the 4 weight rows stay in L1). */
ALWAYS_INLINE void rows_i8_avx2_type(int type, float *out, size_t os, const tl_matrix *w, int r0, int r1,
                                     const tl_quant_x *xq, int n) {
    int r = r0;
    for (; r + 4 <= r1; r += 4) {
        int t = 0;
        for (; t + 2 <= n; t += 2) tile_i8_avx2(type, 4, 2, w, r, xq, t, out, os);
        for (; t < n; t++) tile_i8_avx2(type, 4, 1, w, r, xq, t, out, os);
    }
    for (; r < r1; r++)
        for (int t = 0; t < n; t++) tile_i8_avx2(type, 1, 1, w, r, xq, t, out, os);
}

void tl_rows_i8_avx2(float *out, size_t os, const tl_matrix *w, int r0, int r1, const tl_quant_x *xq, int n) {
    switch (w->type) {
    case TL_TYPE_Q8: rows_i8_avx2_type(TL_TYPE_Q8, out, os, w, r0, r1, xq, n); break;
    case TL_TYPE_Q8_0: rows_i8_avx2_type(TL_TYPE_Q8_0, out, os, w, r0, r1, xq, n); break;
    default: rows_i8_avx2_type(TL_TYPE_Q4_0, out, os, w, r0, r1, xq, n); break;
    }
}

TL_TARGET_END

/* vnni (AVX512-VNNI): vpdpbusd on 256-bit vectors for one token at a time (lanes_i8_vnni), on 512-bit
 * vectors for the batched tile, both adding each block's exact integer dot in the same float order. */
TL_TARGET_BEGIN("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")

/* The exact integer dots of 8 rows' blocks with one token (d[i]: row i's 8 partial sums) as 8 int32
 * lanes in row order: horizontal adds pair the rows up, then the two 128-bit halves are added. */
ALWAYS_INLINE __m256i sum_rows8(const __m256i d[8]) {
    const __m256i ab = _mm256_hadd_epi32(d[0], d[1]), cd = _mm256_hadd_epi32(d[2], d[3]);
    const __m256i ef = _mm256_hadd_epi32(d[4], d[5]), gh = _mm256_hadd_epi32(d[6], d[7]);
    const __m256i abcd = _mm256_hadd_epi32(ab, cd), efgh = _mm256_hadd_epi32(ef, gh); /* low halves | high halves */
    return _mm256_add_epi32(_mm256_permute2x128_si256(abcd, efgh, 0x20), _mm256_permute2x128_si256(abcd, efgh, 0x31));
}

/* Block b's scales of 8 rows as one vector: q8_0 and q4_0 keep an fp16 at each block's start, converted
 * 8 at once; llama2.c int8 groups (TL_TYPE_Q8) have float scales apart, read only at a group's first
 * block into dw. (Storing the 8 scales one by one and loading them back as a vector, as for Q8, costs
 * a store-forwarding stall per block: it is on the decode path of every q8_0/q4_0 matmul.) */
ALWAYS_INLINE __m256 row_scales8(int type, const tl_matrix *w, const unsigned char *const row[8], int r, int R, int b,
                                 size_t block_bytes, int blocks_per_scale, float dw[8]) {
    if (type != TL_TYPE_Q8) {
        uint16_t h[8];
        for (int i = 0; i < 8; i++) memcpy(&h[i], row[i] + (size_t)b * block_bytes, 2);
        return _mm256_cvtph_ps(_mm_setr_epi16((short)h[0], (short)h[1], (short)h[2], (short)h[3], (short)h[4],
                                              (short)h[5], (short)h[6], (short)h[7]));
    }
    if (b % blocks_per_scale == 0)
        for (int i = 0; i < R; i++) dw[i] = block_scale(type, w, row[i], r + i, b / blocks_per_scale);
    return _mm256_loadu_ps(dw);
}

/* out[(t0 + t) * os + r + i] = row r + i of W . token t0 + t of xq, for R <= 8 rows x T tokens (the
 * matmuls of fewer tokens than the batched tile takes: decode). The lanes are rows: per block, each
 * row's exact integer dot (vpdpbusd of the tile's unsigned weights u with the token's values, summed
 * across by sum_rows8, less the offset of u times the token's sum), converted and scaled by d_w * d_x
 * into the row's lane of the accumulator, block after block. That is the batched tile's arithmetic
 * lane for lane (its lanes are tokens), so a token's outputs have the same bits whichever kernel
 * computed them: a batched step equals its sequences alone, and a prompt's logits do not depend on
 * how it was chunked. */
ALWAYS_INLINE void lanes_i8_vnni(int type, int R, int T, const tl_matrix *w, int r, const tl_quant_x *xq, int t0,
                                float *out, size_t os) {
    const size_t stride = row_bytes(w), block_bytes = wblock_bytes_i8(type);
    const int nb = xq->blocks;
    const int blocks_per_scale = type == TL_TYPE_Q8 ? w->group_size / TL_QK : 1;
    const int shift = type == TL_TYPE_Q4_0 ? 3 : 7; /* the offset of u: 8 or 128 */
    const unsigned char *row[8];
    for (int i = 0; i < 8; i++) row[i] = (const unsigned char *)w->data + (size_t)(r + (i < R ? i : 0)) * stride;
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    float dw[8] = {0};
    for (int b = 0; b < nb; b++) {
        __m256i xv[2], dot[2][8], offset[2];
        float dx[2];
        for (int t = 0; t < T; t++) {
            const size_t tb = (size_t)(t0 + t) * nb + b;
            xv[t] = _mm256_loadu_si256((const __m256i *)(xq->q + tb * TL_QK));
            dx[t] = xq->d[tb];
            offset[t] = _mm256_set1_epi32(xq->isum[tb] * (1 << shift));
        }
        for (int i = 0; i < 8; i++) {
            _mm_prefetch((const char *)row[i] + (size_t)b * block_bytes + PREFETCH_BYTES, _MM_HINT_T0);
            __m256i u = wblock_i8(type, row[i], b); /* q4_0: the nibble, w + 8 */
            if (type != TL_TYPE_Q4_0) u = _mm256_xor_si256(u, _mm256_set1_epi8((char)0x80)); /* w + 128 */
            for (int t = 0; t < T; t++) dot[t][i] = _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, xv[t]);
        }
        const __m256 scales = row_scales8(type, w, row, r, R, b, block_bytes, blocks_per_scale, dw);
        for (int t = 0; t < T; t++) {
            const __m256i exact = _mm256_sub_epi32(sum_rows8(dot[t]), offset[t]);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), _mm256_mul_ps(scales, _mm256_set1_ps(dx[t])), acc[t]);
        }
    }
    for (int t = 0; t < T; t++) {
        float lanes[8];
        _mm256_storeu_ps(lanes, acc[t]);
        for (int i = 0; i < R; i++) out[(size_t)(t0 + t) * os + r + i] = lanes[i];
    }
}

/* Rows [r0, r1) for every token, 8 rows x 2 tokens at a time (the 8 weight rows stay in L1). */
ALWAYS_INLINE void rows_i8_vnni_type(int type, float *out, size_t os, const tl_matrix *w, int r0, int r1,
                                     const tl_quant_x *xq, int n) {
    for (int r = r0; r < r1; r += 8) {
        const int R = r1 - r < 8 ? r1 - r : 8;
        int t = 0;
        for (; t + 2 <= n; t += 2) lanes_i8_vnni(type, R, 2, w, r, xq, t, out, os);
        for (; t < n; t++) lanes_i8_vnni(type, R, 1, w, r, xq, t, out, os);
    }
}

/* ---- vnni's batched tile (n >= TL_VNNI_TILE_MIN_TOKENS) ---------------------------------------------
 * One token at a time, each 32-byte weight block costs per token two sign transfers, a vpdpbusd, a
 * conversion and an FMA (the kernels above). Here the lanes are tokens instead: 4 bytes of a weight
 * row are broadcast to all 16 lanes of a 512-bit vpdpbusd against the same 4 columns of 16 tokens
 * (x laid out so by tl_quantize_x), so a block is 8 vpdpbusd for 16 tokens, then one conversion and
 * one FMA for them, and each broadcast weight is used for 2 groups (32 tokens), each token vector
 * for 4 rows. vpdpbusd wants the broadcast operand unsigned: the weights are unpacked once per 4
 * rows as u = w + 128 (q8_0, int8) or the q4_0 nibble u = w + 8, and the integer dot then carries
 * 128 (or 8) times the sum of the token's values, which the accumulator starts at minus that (exact:
 * |u * x| sums stay below 2^21). */
#define TILE_ROWS 4
#define TILE_GROUPS 2

/* Rows r .. r + R - 1 of w as unsigned bytes (row i, block b at wu + (i * nb + b) * 32) and each
 * block's scale (dw[i * nb + b]). */
ALWAYS_INLINE void unpack_rows_u8(int type, const tl_matrix *w, int r, int R, uint8_t *wu, float *dw) {
    const size_t stride = row_bytes(w);
    const int nb = w->cols / TL_QK;
    const int blocks_per_scale = type == TL_TYPE_Q8 ? w->group_size / TL_QK : 1;
    const __m128i low = _mm_set1_epi8(0x0F);
    const __m256i bias = _mm256_set1_epi8((char)0x80);
    for (int i = 0; i < R; i++) {
        const unsigned char *row = (const unsigned char *)w->data + (size_t)(r + i) * stride;
        for (int b = 0; b < nb; b++) {
            __m256i u;
            if (type == TL_TYPE_Q4_0) {
                const __m128i q = _mm_loadu_si128((const __m128i *)(row + (size_t)b * TL_Q4_0_BLOCK_BYTES + 2));
                u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low), _mm_and_si128(q, low));
            } else {
                u = _mm256_xor_si256(wblock_i8(type, row, b), bias);
            }
            _mm256_store_si256((__m256i *)(wu + ((size_t)i * nb + b) * TL_QK), u);
            dw[(size_t)i * nb + b] = block_scale(type, w, row, r + i, b / blocks_per_scale);
        }
    }
}

/* out[t * os + r + i] for R unpacked rows and the tokens t of groups g0 .. g0 + G - 1 (t < n). */
ALWAYS_INLINE void tile_u8_vnni(int type, int R, int G, const uint8_t *wu, const float *dw, int nb,
                               const tl_quant_x *xq, int g0, float *out, size_t os, int r, int n) {
    const int shift = type == TL_TYPE_Q4_0 ? 3 : 7; /* the offset of u: 8 or 128 */
    __m512 acc[TILE_ROWS][TILE_GROUPS];
    for (int i = 0; i < R; i++)
        for (int g = 0; g < G; g++) acc[i][g] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m512i dot[TILE_ROWS][TILE_GROUPS];
        for (int g = 0; g < G; g++) {
            const size_t gb = (size_t)(g0 + g) * nb + b;
            const __m512i start = _mm512_slli_epi32(_mm512_loadu_si512(xq->sumt + gb * 16), shift);
            for (int i = 0; i < R; i++) dot[i][g] = start;
        }
        for (int c = 0; c < 8; c++) {
            __m512i xv[TILE_GROUPS];
            for (int g = 0; g < G; g++)
                xv[g] = _mm512_load_si512(xq->qt + (((size_t)(g0 + g) * nb + b) * 8 + c) * 64);
            for (int i = 0; i < R; i++) {
                int32_t w4;
                memcpy(&w4, wu + ((size_t)i * nb + b) * TL_QK + 4 * c, 4);
                const __m512i wv = _mm512_set1_epi32(w4);
                for (int g = 0; g < G; g++) dot[i][g] = _mm512_dpbusd_epi32(dot[i][g], wv, xv[g]);
            }
        }
        for (int g = 0; g < G; g++) {
            const __m512 dx = _mm512_loadu_ps(xq->dt + ((size_t)(g0 + g) * nb + b) * 16);
            for (int i = 0; i < R; i++) {
                const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(dw[(size_t)i * nb + b]), dx);
                acc[i][g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i][g]), scale, acc[i][g]);
            }
        }
    }
    for (int g = 0; g < G; g++) {
        const int t0 = (g0 + g) * 16, tokens = n - t0 < 16 ? n - t0 : 16;
        for (int i = 0; i < R; i++) {
            float lanes[16];
            _mm512_storeu_ps(lanes, acc[i][g]);
            for (int l = 0; l < tokens; l++) out[(size_t)(t0 + l) * os + r + i] = lanes[l];
        }
    }
}

/* Rows [r0, r1) for every token: 4 rows unpacked at a time, then 2 groups of 16 tokens at a time. */
ALWAYS_INLINE void rows_tile_vnni_type(int type, float *out, size_t os, const tl_matrix *w, int r0, int r1,
                                       const tl_quant_x *xq, int n, uint8_t *wu, float *dw) {
    const int nb = xq->blocks;
    for (int r = r0; r < r1;) {
        const int R = r1 - r >= TILE_ROWS ? TILE_ROWS : 1;
        unpack_rows_u8(type, w, r, R, wu, dw);
        int g = 0;
        for (; g + TILE_GROUPS <= xq->groups; g += TILE_GROUPS) {
            if (R == TILE_ROWS) tile_u8_vnni(type, TILE_ROWS, TILE_GROUPS, wu, dw, nb, xq, g, out, os, r, n);
            else tile_u8_vnni(type, 1, TILE_GROUPS, wu, dw, nb, xq, g, out, os, r, n);
        }
        for (; g < xq->groups; g++) {
            if (R == TILE_ROWS) tile_u8_vnni(type, TILE_ROWS, 1, wu, dw, nb, xq, g, out, os, r, n);
            else tile_u8_vnni(type, 1, 1, wu, dw, nb, xq, g, out, os, r, n);
        }
        r += R;
    }
}

/* The tile's rows; 0 if its weight buffer cannot be had (the caller then goes one token at a time). */
static int rows_tile_vnni(float *out, size_t os, const tl_matrix *w, int r0, int r1, const tl_quant_x *xq, int n) {
    const size_t wu_bytes = (size_t)TILE_ROWS * w->cols;
    uint8_t *wu = quant_scratch(SCRATCH_WEIGHTS, wu_bytes + (size_t)TILE_ROWS * xq->blocks * sizeof(float));
    if (wu == NULL) return 0;
    float *dw = (float *)(wu + wu_bytes);
    switch (w->type) {
    case TL_TYPE_Q8: rows_tile_vnni_type(TL_TYPE_Q8, out, os, w, r0, r1, xq, n, wu, dw); break;
    case TL_TYPE_Q8_0: rows_tile_vnni_type(TL_TYPE_Q8_0, out, os, w, r0, r1, xq, n, wu, dw); break;
    default: rows_tile_vnni_type(TL_TYPE_Q4_0, out, os, w, r0, r1, xq, n, wu, dw); break;
    }
    return 1;
}

void tl_rows_i8_vnni(float *out, size_t os, const tl_matrix *w, int r0, int r1, const tl_quant_x *xq, int n) {
    if (xq->groups > 0 && rows_tile_vnni(out, os, w, r0, r1, xq, n)) return;
    switch (w->type) {
    case TL_TYPE_Q8: rows_i8_vnni_type(TL_TYPE_Q8, out, os, w, r0, r1, xq, n); break;
    case TL_TYPE_Q8_0: rows_i8_vnni_type(TL_TYPE_Q8_0, out, os, w, r0, r1, xq, n); break;
    default: rows_i8_vnni_type(TL_TYPE_Q4_0, out, os, w, r0, r1, xq, n); break;
    }
}

TL_TARGET_END
#endif /* TL_X86 */

#ifdef TL_X86
/* ---- amx: vnni's batched tile on AMX tiles (TINYLLM_KERNELS=amx) ---------------------------------
 * The same unsigned weights and token groups as vnni's tile, multiplied by the tile unit instead:
 * TDPBUSD takes A = 16 unpacked weight rows x one block (16 x 32 unsigned bytes, row i of wu) and
 * B = one block of a token group as tl_quantize_x lays it out (8 rows of 4 columns x 16 tokens: the
 * VNNI layout AMX wants), giving C = 16 rows x 16 tokens of integer block dots in one instruction
 * where vnni's tile needs 128 vpdpbusd. Each block's C is stored, offset and scaled exactly as vnni's
 * tile does it (the same integers, the same float operations in the same order), so the two give
 * the same bits; rows left over from 16 and one-token matmuls go to vnni's kernels.
 *
 * Linux hands out AMX state only to a process that asked for it (arch_prctl ARCH_REQ_XCOMP_PERM for
 * XTILEDATA); tl_amx_permitted asks once, and a kernel that refuses leaves the path unsupported. */

#define AMX_ROWS 16
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int amx_permitted = -1;
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;

static void amx_request(void) {
#if defined(__linux__) && defined(SYS_arch_prctl)
    amx_permitted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
    amx_permitted = 0;
#endif
}

int tl_amx_permitted(void) {
    pthread_once(&amx_once, amx_request);
    return amx_permitted;
}

/* The tile configuration (palette 1): tmm0 C (16 x 16 int32), tmm1 A (16 rows x 32 bytes), tmm2 B
 * (8 rows x 64 bytes). */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

TL_TARGET_BEGIN("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")

static void amx_configure(void) {
    amx_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette = 1;
    cfg.rows[0] = AMX_ROWS, cfg.colsb[0] = 64;
    cfg.rows[1] = AMX_ROWS, cfg.colsb[1] = TL_QK;
    cfg.rows[2] = TL_QK / 4, cfg.colsb[2] = 64;
    _tile_loadconfig(&cfg);
}

/* out[t * os + r + i] for the 16 unpacked rows at wu and the tokens t of group g (t < n). */
ALWAYS_INLINE void tile_u8_amx(int type, const uint8_t *wu, const float *dw, int nb, const tl_quant_x *xq, int g,
                               float *out, size_t os, int r, int n) {
    const int shift = type == TL_TYPE_Q4_0 ? 3 : 7; /* the offset of u: 8 or 128 */
    int32_t dots[AMX_ROWS][16] __attribute__((aligned(64)));
    __m512 acc[AMX_ROWS];
    for (int i = 0; i < AMX_ROWS; i++) acc[i] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const size_t gb = (size_t)g * nb + b;
        _tile_zero(0);
        _tile_loadd(1, wu + (size_t)b * TL_QK, (size_t)nb * TL_QK);
        _tile_loadd(2, xq->qt + gb * 8 * 64, 64);
        _tile_dpbusd(0, 1, 2);
        _tile_stored(0, dots, 64);
        const __m512i start = _mm512_slli_epi32(_mm512_loadu_si512(xq->sumt + gb * 16), shift);
        const __m512 dx = _mm512_loadu_ps(xq->dt + gb * 16);
        for (int i = 0; i < AMX_ROWS; i++) {
            const __m512i dot = _mm512_add_epi32(start, _mm512_load_si512(dots[i]));
            const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(dw[(size_t)i * nb + b]), dx);
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[i]);
        }
    }
    const int t0 = g * 16, tokens = n - t0 < 16 ? n - t0 : 16;
    for (int i = 0; i < AMX_ROWS; i++) {
        float lanes[16];
        _mm512_storeu_ps(lanes, acc[i]);
        for (int l = 0; l < tokens; l++) out[(size_t)(t0 + l) * os + r + i] = lanes[l];
    }
}

ALWAYS_INLINE void rows_tile_amx_type(int type, float *out, size_t os, const tl_matrix *w, int r0, int r1,
                                      const tl_quant_x *xq, int n, uint8_t *wu, float *dw) {
    const int nb = xq->blocks;
    for (int r = r0; r < r1; r += AMX_ROWS) {
        unpack_rows_u8(type, w, r, AMX_ROWS, wu, dw);
        for (int g = 0; g < xq->groups; g++) tile_u8_amx(type, wu, dw, nb, xq, g, out, os, r, n);
    }
}

/* Rows [r0, r0 + 16k) on the tiles; returns how many rows it did (0 if its buffer cannot be had). */
static int rows_tile_amx(float *out, size_t os, const tl_matrix *w, int r0, int r1, const tl_quant_x *xq, int n) {
    const int rows = (r1 - r0) / AMX_ROWS * AMX_ROWS;
    if (rows == 0) return 0;
    const size_t wu_bytes = (size_t)AMX_ROWS * w->cols;
    uint8_t *wu = quant_scratch(SCRATCH_WEIGHTS, wu_bytes + (size_t)AMX_ROWS * xq->blocks * sizeof(float));
    if (wu == NULL) return 0;
    float *dw = (float *)(wu + wu_bytes);
    amx_configure(); /* per call: the configuration is per thread, and released below */
    switch (w->type) {
    case TL_TYPE_Q8: rows_tile_amx_type(TL_TYPE_Q8, out, os, w, r0, r0 + rows, xq, n, wu, dw); break;
    case TL_TYPE_Q8_0: rows_tile_amx_type(TL_TYPE_Q8_0, out, os, w, r0, r0 + rows, xq, n, wu, dw); break;
    default: rows_tile_amx_type(TL_TYPE_Q4_0, out, os, w, r0, r0 + rows, xq, n, wu, dw); break;
    }
    _tile_release();
    return rows;
}

void tl_rows_i8_amx(float *out, size_t os, const tl_matrix *w, int r0, int r1, const tl_quant_x *xq, int n) {
    if (xq->groups > 0) r0 += rows_tile_amx(out, os, w, r0, r1, xq, n);
    if (r0 < r1) tl_rows_i8_vnni(out, os, w, r0, r1, xq, n);
}

TL_TARGET_END
#endif /* TL_X86 */
