/* Fused inference kernel for the U-Net's residual blocks on x86-64 CPUs with AVX2 and FMA:
 *
 *     y = conv3x3(silu(groupnorm(x) * (1 + scale) + shift)) + bias + res
 *
 * where x may be a concatenation of two inputs (a U-Net skip) or a nearest 2x upsampling of one, and res
 * may be a 1x1 convolution of the block's input (the residual branch). Activations are channels-last
 * (N, H, W, C) float32. Why by hand: oneDNN's 3x3 convolution runs a
 * 16-channel layer at about half the rate of a 64-channel one, and GroupNorm, SiLU, the time
 * scale/shift and the residual add are each a separate pass over memory whose cost shrinks only
 * linearly with width. Here each image's normalised, activated input is written once into a small
 * zero-padded buffer that stays in L1/L2, and the convolution reads it from there, so a narrow subnet
 * keeps close to its FLOPs. */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "conv3x3_tiles.h"

/* exp for the SiLU, vectorised: Cephes' expf (range reduction by ln 2, degree-5 polynomial), about
 * 1 ulp on the range used here; inputs are clamped so the result neither overflows nor underflows. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* z / (1 + exp(-z)), the division as a reciprocal estimate refined by one Newton step (a division
 * costs as much as the rest of the pass); relative error about 1e-7. */
static inline __m256 silu256(__m256 z) {
    const __m256 d = _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), z)));
    __m256 r = _mm256_rcp_ps(d);
    r = _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f)));
    return _mm256_mul_ps(z, r);
}

/* The arguments, one struct rather than two dozen positional ones. Pointers to per-image tensors are
 * to (N, H, W, channels) channels-last float32; NULL means "absent". */
typedef struct {
    int n, h, w;                /* output batch and size */
    const float *x1, *x2;       /* the input: x1 (c1 channels), concatenated with x2 (c2) if given */
    int c1, c2;
    int upsample;               /* 1: the inputs are (h/2, w/2), upsampled 2x (nearest) first */
    int stride;                 /* 1, or 2: the inputs are (2h, 2w) */
    const float *weight;        /* (3, 3, c1 + c2, k): output channels innermost */
    const float *bias;          /* (k) */
    int k;
    int groups;                 /* > 0: GroupNorm(groups, gamma, beta, eps) then SiLU on the input */
    const float *gamma, *beta;
    float eps;
    const float *scale, *shift; /* after the norm: * (1 + scale) + shift, row i at i * mod_stride */
    int mod_stride;             /* 0: one row for every image */
    const float *res;           /* (n, h, w, k) added to the output */
    const float *s1, *s2;       /* or: the output plus a 1x1 convolution of concat(s1, s2) */
    int sc1, sc2;
    const float *skip_weight;   /* (sc1 + sc2, k) */
    const float *skip_bias;     /* (k) */
    float *y;                   /* (n, h, w, k) */
} conv_args;

/* Per-thread scratch, grown on demand and kept: the OpenMP threads persist between calls, and a fresh
 * allocation per call would be an mmap (and page faults) for the larger images. */
static __thread float *scratch = NULL;
static __thread size_t scratch_len = 0;

static float *get_scratch(size_t n) {
    if (n > scratch_len) {
        free(scratch);
        scratch = aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64);
        scratch_len = scratch ? n : 0;
    }
    return scratch;
}

/* sum[c] = sum over P pixels of v[p * ld + c], for c < C (channel sums of one image, kept in registers) */
static void channel_sums(float *sum, const float *v, int P, int C, int ld) {
    int c = 0;
    for (; c + 8 <= C; c += 8) {
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
        int p = 0;
        for (; p + 2 <= P; p += 2) {
            s0 = _mm256_add_ps(s0, _mm256_loadu_ps(v + (size_t)p * ld + c));
            s1 = _mm256_add_ps(s1, _mm256_loadu_ps(v + (size_t)(p + 1) * ld + c));
        }
        if (p < P) s0 = _mm256_add_ps(s0, _mm256_loadu_ps(v + (size_t)p * ld + c));
        _mm256_storeu_ps(sum + c, _mm256_add_ps(s0, s1));
    }
    for (; c < C; c++) {
        float t = 0.0f;
        for (int p = 0; p < P; p++) t += v[(size_t)p * ld + c];
        sum[c] = t;
    }
}

/* sum[c] = sum over P pixels of (v[p * ld + c] - m[c])^2, for c < C */
static void channel_sq_dev(float *sum, const float *v, const float *m, int P, int C, int ld) {
    int c = 0;
    for (; c + 8 <= C; c += 8) {
        const __m256 mv = _mm256_loadu_ps(m + c);
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
        int p = 0;
        for (; p + 2 <= P; p += 2) {
            const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(v + (size_t)p * ld + c), mv);
            const __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(v + (size_t)(p + 1) * ld + c), mv);
            s0 = _mm256_fmadd_ps(d0, d0, s0);
            s1 = _mm256_fmadd_ps(d1, d1, s1);
        }
        if (p < P) {
            const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(v + (size_t)p * ld + c), mv);
            s0 = _mm256_fmadd_ps(d0, d0, s0);
        }
        _mm256_storeu_ps(sum + c, _mm256_add_ps(s0, s1));
    }
    for (; c < C; c++) {
        float t = 0.0f;
        for (int p = 0; p < P; p++) t += (v[(size_t)p * ld + c] - m[c]) * (v[(size_t)p * ld + c] - m[c]);
        sum[c] = t;
    }
}

/* dst[c] = silu(a[c] * src[c] + b[c]) for c < C */
static inline void act_row(float *dst, const float *src, const float *a, const float *b, int C) {
    int c = 0;
    for (; c + 8 <= C; c += 8)
        _mm256_storeu_ps(dst + c, silu256(_mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(src + c), _mm256_loadu_ps(b + c))));
    for (; c < C; c++) {
        const float z = a[c] * src[c] + b[c];
        dst[c] = z / (1.0f + expf(-z));
    }
}

/* Write image i's input into the interior of the zero-bordered buffer pad ((he+2) x (we+2) x C),
 * normalised and activated when groups > 0. a and b are scratch (C floats each). */
static void prepare(const conv_args *A, int i, float *pad, float *a, float *b) {
    const int C = A->c1 + A->c2, he = A->h * A->stride, we = A->w * A->stride, Wp = we + 2; /* he x we: padded */
    const int hi = A->upsample ? he / 2 : he, wi = A->upsample ? we / 2 : we, Pi = hi * wi;  /* the inputs */
    const float *x1 = A->x1 + (size_t)i * Pi * A->c1, *x2 = A->x2 ? A->x2 + (size_t)i * Pi * A->c2 : NULL;
    if (A->groups > 0) {
        /* two-pass statistics per group (mean, then mean squared deviation: biased, as GroupNorm);
         * an upsampled image repeats each pixel 4 times, so its statistics are the input's */
        const int cg = C / A->groups;
        channel_sums(a, x1, Pi, A->c1, A->c1);
        if (x2) channel_sums(a + A->c1, x2, Pi, A->c2, A->c2);
        for (int g = 0; g < A->groups; g++) {
            double s = 0.0;
            for (int c = g * cg; c < (g + 1) * cg; c++) s += a[c];
            const float mean = (float)(s / ((double)Pi * cg));
            for (int c = g * cg; c < (g + 1) * cg; c++) b[c] = mean;
        }
        channel_sq_dev(a, x1, b, Pi, A->c1, A->c1);
        if (x2) channel_sq_dev(a + A->c1, x2, b + A->c1, Pi, A->c2, A->c2);
        const float *scale = A->scale ? A->scale + (size_t)i * A->mod_stride : NULL;
        const float *shift = A->shift ? A->shift + (size_t)i * A->mod_stride : NULL;
        for (int g = 0; g < A->groups; g++) {
            double s = 0.0;
            for (int c = g * cg; c < (g + 1) * cg; c++) s += a[c];
            const float rstd = 1.0f / sqrtf((float)(s / ((double)Pi * cg)) + A->eps);
            for (int c = g * cg; c < (g + 1) * cg; c++) {
                /* ((x - mean) * rstd * gamma + beta) * (1 + scale) + shift = a * x + b */
                const float k = scale ? 1.0f + scale[c] : 1.0f, m = shift ? shift[c] : 0.0f;
                const float gs = A->gamma[c] * rstd, mean = b[c];
                a[c] = gs * k;
                b[c] = (A->beta[c] - mean * gs) * k + m;
            }
        }
    }
    for (int y = 0; y < he; y++)
        for (int x = 0; x < we; x++) {
            const size_t src = A->upsample ? (size_t)(y / 2) * wi + x / 2 : (size_t)y * wi + x;
            float *dst = pad + ((size_t)(y + 1) * Wp + x + 1) * C;
            if (A->groups > 0) {
                act_row(dst, x1 + src * A->c1, a, b, A->c1);
                if (x2) act_row(dst + A->c1, x2 + src * A->c2, a + A->c1, b + A->c1, A->c2);
            } else {
                memcpy(dst, x1 + src * A->c1, A->c1 * sizeof(float));
                if (x2) memcpy(dst + A->c1, x2 + src * A->c2, A->c2 * sizeof(float));
            }
        }
}

/* Choose the tile for the next output channels: OB*8 of the `rem` left, over P pixels split into
 * `blocks` equal runs. The score is the accumulators a tile fills on average. */
static void choose_tile(int rem, int P, int *ob_out, int *blocks_out) {
    int best_ob = 1, best_blocks = 1;
    double best = -1.0;
    for (int ob = 1; ob <= 4 && 8 * ob <= rem; ob++) {
        const int blocks = (P + TILE_MAX_PIXELS / ob - 1) / (TILE_MAX_PIXELS / ob);
        double score = (double)P / blocks * ob;
        if (rem % (8 * ob) == 0) score += 0.5; /* no narrower tile needed for the rest */
        if (score > best) best = score, best_ob = ob, best_blocks = blocks;
    }
    *ob_out = best_ob;
    *blocks_out = best_blocks;
}

/* Run the convolution described by A. Returns 0, or -1 if an argument is out of range (k not a
 * multiple of 8, channels not a multiple of groups, odd size with upsample, a stride other than 1 or
 * 2, stride 2 with upsample or a skip) or memory ran out. */
int ddsm_conv3x3(const conv_args *A) {
    const int C = A->c1 + A->c2, K = A->k, H = A->h, W = A->w, P = H * W, st = A->stride;
    const int Wp = W * st + 2, Hp = H * st + 2;
    const int S = A->s1 ? A->sc1 + A->sc2 : 0;
    if (K <= 0 || K % 8 || C <= 0 || (A->groups > 0 && C % A->groups) || (A->upsample && (H % 2 || W % 2)) ||
        (st != 1 && st != 2) || (st == 2 && (A->upsample || S))) return -1;
    int off[9];
    for (int t = 0; t < 9; t++) off[t] = ((t / 3) * Wp + t % 3) * C;
    const int off0[1] = {0};
    /* the tile plan depends only on K and P: chosen once per call, not per image */
    int plan_ob[K / 8], plan_blocks[K / 8], chunks = 0;
    for (int k0 = 0; k0 < K; k0 += 8 * plan_ob[chunks++]) choose_tile(K - k0, P, &plan_ob[chunks], &plan_blocks[chunks]);
    int failed = 0;
    #pragma omp parallel
    {
        const size_t pad_len = (size_t)Hp * Wp * C;
        float *pad = get_scratch(pad_len + 2 * (size_t)C + K);
        if (!pad) {
            #pragma omp atomic write
            failed = 1;
        } else {
            memset(pad, 0, (pad_len + 2 * (size_t)C + K) * sizeof(float));
            float *a = pad + pad_len, *b = a + C;
            const float *zeros = b + C;
            #pragma omp for schedule(static)
            for (int i = 0; i < A->n; i++) {
                prepare(A, i, pad, a, b);
                float *yi = A->y + (size_t)i * P * K;
                const float *ri = A->res ? A->res + (size_t)i * P * K : NULL;
                const float *s1 = A->s1 ? A->s1 + (size_t)i * P * A->sc1 : NULL;
                const float *s2 = A->s2 ? A->s2 + (size_t)i * P * A->sc2 : NULL;
                for (int j = 0, k0 = 0; j < chunks; k0 += 8 * plan_ob[j++]) {
                    const int ob = plan_ob[j], blocks = plan_blocks[j];
                    for (int blk = 0, p0 = 0; blk < blocks; blk++) {
                        const int p1 = (int)((long)P * (blk + 1) / blocks); /* P = 16 -> 6, 5, 5 */
                        const float *px[TILE_MAX_PIXELS], *rp[TILE_MAX_PIXELS];
                        float *out[TILE_MAX_PIXELS];
                        const tile_fn tile = TILES[ob - 1][p1 - p0 - 1];
                        for (int p = p0; p < p1; p++) {
                            out[p - p0] = yi + (size_t)p * K + k0;
                            rp[p - p0] = ri ? ri + (size_t)p * K + k0 : out[p - p0];
                        }
                        if (S) { /* the 1x1 skip convolution first, into the output; then added below */
                            for (int p = p0; p < p1; p++) px[p - p0] = s1 + (size_t)p * A->sc1;
                            tile(px, A->skip_weight + k0, A->sc1, K, 1, off0, A->skip_bias + k0, out, NULL);
                            if (s2) {
                                for (int p = p0; p < p1; p++) px[p - p0] = s2 + (size_t)p * A->sc2;
                                tile(px, A->skip_weight + (size_t)A->sc1 * K + k0, A->sc2, K, 1, off0, zeros, out,
                                     (const float *const *)out);
                            }
                        }
                        for (int p = p0; p < p1; p++) px[p - p0] = pad + ((size_t)(p / W) * st * Wp + (p % W) * st) * C;
                        tile(px, A->weight + k0, C, K, 9, off, A->bias + k0, out, (ri || S) ? rp : NULL);
                        p0 = p1;
                    }
                }
            }
        }
    }
    return failed ? -1 : 0;
}
