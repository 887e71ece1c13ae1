/* Fused inference kernel for U-Nets on x86-64 CPUs with AVX2 and FMA. Each convolution layer computes
 *
 *     y = conv(act(groupnorm(x) * (1 + scale) + shift)) + bias + res      (conv: 3x3, or 1x1)
 *
 * where x may be a concatenation of two inputs (a U-Net skip) or a nearest 2x upsampling of one, and res
 * may be a 1x1 convolution of the block's input (the residual branch). Activations are channels-last
 * (N, H, W, C) float32. Why by hand: oneDNN's 3x3 convolution runs a
 * 16-channel layer at about half the rate of a 64-channel one, and GroupNorm, SiLU, the time
 * scale/shift and the residual add are each a separate pass over memory whose cost shrinks only
 * linearly with width. Here each image's normalised, activated input is written once into a small
 * zero-padded buffer that stays in L1/L2, and the convolution reads it from there, so a narrow subnet
 * keeps close to its FLOPs.
 *
 * ddsm_run(), the one entry point, runs a whole network (a list of such convolutions and attention
 * layers) one image at a time: every image is independent at inference, so each thread takes its
 * images through all the layers with the activations in a small per-thread arena that stays in cache,
 * and there is one call from Python per forward instead of one per layer. */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "conv3x3_tiles.h"

/* exp, vectorised, for the SiLU and the softmax: relative error about 3e-7 on [-80, 80], inputs clamped
 * to it (the SiLU and the softmax only need exp(-80) to be tiny, not 0). n = round(x log2 e) comes from
 * adding the 1.5 * 2^23 shifter, which leaves n in the low mantissa bits, so that 2^n is an integer add
 * into the exponent bits; r = x - n ln 2 in one FMA (n ln 2's rounding costs under 2.5e-7 of relative
 * error); and exp(r) = 1 + r + r^2 P(r) with Cephes' degree-5 P evaluated by Estrin's scheme. The SiLU
 * measured latency-bound (versions with fewer operations but the same chain ran no faster), so the
 * short chain is what counts: this measured 15% faster than a Horner polynomial after a rounding
 * instruction and a two-constant reduction. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-80.0f)), _mm256_set1_ps(80.0f));
    const __m256 shifter = _mm256_set1_ps(12582912.0f);
    const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), shifter);
    const __m256 n = _mm256_sub_ps(t, shifter);
    const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693147180559945f), x);
    const __m256 r2 = _mm256_mul_ps(r, r);
    const __m256 p45 = _mm256_fmadd_ps(_mm256_set1_ps(1.9875691500e-4f), r, _mm256_set1_ps(1.3981999507e-3f));
    const __m256 p23 = _mm256_fmadd_ps(_mm256_set1_ps(8.3334519073e-3f), r, _mm256_set1_ps(4.1665795894e-2f));
    const __m256 p01 = _mm256_fmadd_ps(_mm256_set1_ps(1.6666665459e-1f), r, _mm256_set1_ps(5.0000001201e-1f));
    const __m256 P = _mm256_fmadd_ps(_mm256_fmadd_ps(p45, r2, p23), r2, p01);
    const __m256 y = _mm256_fmadd_ps(P, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_castps_si256(t), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(y), e));
}

/* z / (1 + exp(-z)); a division measured as fast as a refined reciprocal estimate, and is correctly
 * rounded. */
static inline __m256 silu256(__m256 z) {
    const __m256 e = exp256(_mm256_xor_ps(z, _mm256_set1_ps(-0.0f)));
    return _mm256_div_ps(z, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

/* One convolution layer of a network; activations are per image (H, W, channels) float32. */
typedef struct {
    int h, w;                   /* output size */
    int c1, c2;                 /* the input: c1 channels, concatenated with c2 more if c2 > 0 */
    int upsample;               /* 1: the inputs are (h/2, w/2), upsampled 2x (nearest) first */
    int stride;                 /* 1, or 2: the inputs are (2h, 2w) */
    const float *weight;        /* (3, 3, c1 + c2, k), or (c1 + c2, k) for a 1x1: output channels innermost;
                                 * with k < 8 (a network's last layer), (k, taps, c1 + c2), see conv_narrow */
    const float *bias;          /* (k) */
    int k;
    int groups;                 /* > 0: GroupNorm(groups, gamma, beta, eps) then SiLU on the input */
    const float *gamma, *beta;
    float eps;
    const float *scale, *shift; /* after the norm: * (1 + scale) + shift, image i's row at i * mod_stride */
    int mod_stride;             /* 0: one row for every image */
    int sc1, sc2;               /* > 0: the output plus a 1x1 convolution of concat(s1, s2) (sc1, sc2 channels) */
    const float *skip_weight;   /* (sc1 + sc2, k) */
    const float *skip_bias;     /* (k) */
    int kernel1x1;              /* 1: a 1x1 convolution (stride 1, no upsample) instead of 3x3, padding 1 */
    int no_act;                 /* 1: the norm (and scale/shift) without the SiLU */
} conv_args;

/* One image's tensors for a layer: x1, x2 its input, res a residual (h, w, k) to add or s1, s2 the
 * skip convolution's input, y its output; scale, shift its rows of conv_args'. */
typedef struct {
    const float *x1, *x2, *res, *s1, *s2, *scale, *shift;
    float *y;
} image_io;

#define MAX_CHUNKS 256 /* k up to 2048 */

/* What a convolution needs beyond its arguments, fixed for a call: the register-tile plan (it depends
 * only on k and the pixel count) and the taps' offsets in the padded buffer. */
typedef struct {
    int C, P, Wp, Hp, taps, chunks, direct;
    int off[9];
    int ob[MAX_CHUNKS], blocks[MAX_CHUNKS];
    size_t pad_len;             /* floats of scratch: the padded input, then a, b (C each) and k zeros */
} conv_plan;

/* Per-thread scratch, grown on demand and kept: the OpenMP threads persist between calls, and a fresh
 * allocation per call would be an mmap (and page faults) for the larger images. */
static __thread float *scratch = NULL;
static __thread size_t scratch_len = 0;
/* Which padded geometry's zero border is intact in this thread's scratch (pad NULL: none). Writing the
 * border costs as much as a small layer's interior, so it is rewritten only when the geometry changes;
 * anything else written to the scratch (another geometry, a direct 1x1, attention) forgets it. */
static __thread const float *border_pad = NULL;
static __thread int border_hp = 0, border_wp = 0, border_c = 0;

static float *get_scratch(size_t n) {
    if (n > scratch_len) {
        free(scratch);
        scratch = aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64);
        scratch_len = scratch ? n : 0;
        border_pad = NULL;
    }
    return scratch;
}

static int border_intact(const float *pad, int Hp, int Wp, int C) {
    return pad == border_pad && Hp == border_hp && Wp == border_wp && C == border_c;
}

static void zero_border(float *pad, int Hp, int Wp, int C) {
    if (border_intact(pad, Hp, Wp, C)) return;
    const size_t row = (size_t)Wp * C;
    memset(pad, 0, row * sizeof(float));
    memset(pad + (size_t)(Hp - 1) * row, 0, row * sizeof(float));
    for (int y = 1; y < Hp - 1; y++) {
        memset(pad + (size_t)y * row, 0, C * sizeof(float));
        memset(pad + (size_t)y * row + (size_t)(Wp - 1) * C, 0, C * sizeof(float));
    }
    border_pad = pad, border_hp = Hp, border_wp = Wp, border_c = C;
}

/* Per-channel sums over the P pixels of v (row stride ld), for NV 8-channel vectors at c: plain
 * (m NULL) or of squared deviations from m. U pixels at a time, so that NV * U accumulators are
 * independent chains (one chain per vector, latency-bound, measured half as fast). */
static inline __attribute__((always_inline)) void sums_block(float *sum, const float *v, const float *m, int P,
                                                             int ld, int c, const int NV, const int U) {
    __m256 acc[4][4], mv[4];
    for (int j = 0; j < NV; j++) {
        mv[j] = m ? _mm256_loadu_ps(m + c + 8 * j) : _mm256_setzero_ps();
        for (int u = 0; u < U; u++) acc[u][j] = _mm256_setzero_ps();
    }
    int p = 0;
    for (; p + U <= P; p += U)
        for (int u = 0; u < U; u++)
            for (int j = 0; j < NV; j++) {
                const __m256 x = _mm256_loadu_ps(v + (size_t)(p + u) * ld + c + 8 * j);
                if (m) {
                    const __m256 d = _mm256_sub_ps(x, mv[j]);
                    acc[u][j] = _mm256_fmadd_ps(d, d, acc[u][j]);
                } else {
                    acc[u][j] = _mm256_add_ps(acc[u][j], x);
                }
            }
    for (; p < P; p++)
        for (int j = 0; j < NV; j++) {
            const __m256 x = _mm256_loadu_ps(v + (size_t)p * ld + c + 8 * j);
            if (m) {
                const __m256 d = _mm256_sub_ps(x, mv[j]);
                acc[0][j] = _mm256_fmadd_ps(d, d, acc[0][j]);
            } else {
                acc[0][j] = _mm256_add_ps(acc[0][j], x);
            }
        }
    for (int j = 0; j < NV; j++) {
        for (int u = 1; u < U; u++) acc[0][j] = _mm256_add_ps(acc[0][j], acc[u][j]);
        _mm256_storeu_ps(sum + c + 8 * j, acc[0][j]);
    }
}

/* sum[c] = sum over P pixels of v[p * ld + c], or of (v[p * ld + c] - m[c])^2 when m, for c < C */
static void channel_sums(float *sum, const float *v, const float *m, int P, int C, int ld) {
    int c = 0;
    for (; c + 32 <= C; c += 32) m ? sums_block(sum, v, m, P, ld, c, 4, 2) : sums_block(sum, v, NULL, P, ld, c, 4, 2);
    for (; c + 16 <= C; c += 16) m ? sums_block(sum, v, m, P, ld, c, 2, 4) : sums_block(sum, v, NULL, P, ld, c, 2, 4);
    for (; c + 8 <= C; c += 8) m ? sums_block(sum, v, m, P, ld, c, 1, 4) : sums_block(sum, v, NULL, P, ld, c, 1, 4);
    for (; c < C; c++) {
        float t = 0.0f;
        for (int p = 0; p < P; p++) {
            const float x = v[(size_t)p * ld + c] - (m ? m[c] : 0.0f);
            t += m ? x * x : x;
        }
        sum[c] = t;
    }
}

/* Write one input (cs channels per pixel, hi x wi pixels) into channels coff.. of the padded buffer's
 * interior (row stride Wp pixels of C channels), each pixel's value copied (mode COPY), or a * x + b
 * (AFFINE), or silu(a * x + b) (SILU), with a, b per channel; upsampled 2x (nearest) when up, the
 * value computed once per input pixel and stored to its four. The loop runs over one 8-channel vector
 * at a time, across all pixels: a and b stay in registers and the iterations are independent, so the
 * SiLU's long dependency chain pipelines (a call per pixel, over its channels, measured 1.5x slower
 * at 16 channels, in place). */
enum { COPY = 0, AFFINE = 1, SILU = 2 };

static inline __attribute__((always_inline)) void act_plane(float *pad, int Wp, int C, int coff, const float *x,
                                                            int cs, int hi, int wi, int up, const float *a,
                                                            const float *b, int mode) {
    const int f = up ? 2 : 1;
    float *base = pad + ((size_t)Wp + 1) * C + coff; /* interior pixel (0, 0) */
    int c = 0;
    for (; c + 8 <= cs; c += 8) {
        const __m256 av = mode == COPY ? _mm256_setzero_ps() : _mm256_loadu_ps(a + c);
        const __m256 bv = mode == COPY ? _mm256_setzero_ps() : _mm256_loadu_ps(b + c);
        for (int y = 0; y < hi; y++) {
            const float *s = x + (size_t)y * wi * cs + c;
            float *d = base + (size_t)y * f * Wp * C + c;
            for (int i = 0; i < wi; i++, s += cs, d += (size_t)f * C) {
                __m256 v = _mm256_loadu_ps(s);
                if (mode != COPY) v = _mm256_fmadd_ps(av, v, bv);
                if (mode == SILU) v = silu256(v);
                _mm256_storeu_ps(d, v);
                if (up) {
                    _mm256_storeu_ps(d + C, v);
                    _mm256_storeu_ps(d + (size_t)Wp * C, v);
                    _mm256_storeu_ps(d + (size_t)Wp * C + C, v);
                }
            }
        }
    }
    for (; c < cs; c++)
        for (int y = 0; y < hi; y++)
            for (int i = 0; i < wi; i++) {
                float v = x[((size_t)y * wi + i) * cs + c];
                if (mode != COPY) v = a[c] * v + b[c];
                if (mode == SILU) v = v / (1.0f + expf(-v));
                float *d = base + ((size_t)y * f * Wp + (size_t)i * f) * C + c;
                d[0] = v;
                if (up) d[C] = v, d[(size_t)Wp * C] = v, d[(size_t)Wp * C + C] = v;
            }
}

/* Write one image's input into the interior of the zero-bordered buffer pad ((he+2) x (we+2) x C),
 * normalised and activated when groups > 0. a and b are scratch (C floats each). */
static void prepare(const conv_args *A, const image_io *io, float *pad, float *a, float *b) {
    const int C = A->c1 + A->c2, he = A->h * A->stride, we = A->w * A->stride, Wp = we + 2; /* he x we: padded */
    const int hi = A->upsample ? he / 2 : he, wi = A->upsample ? we / 2 : we, Pi = hi * wi;  /* the inputs */
    const float *x1 = io->x1, *x2 = io->x2;
    if (A->groups > 0) {
        /* two-pass statistics per group (mean, then mean squared deviation: biased, as GroupNorm);
         * an upsampled image repeats each pixel 4 times, so its statistics are the input's */
        const int cg = C / A->groups;
        channel_sums(a, x1, NULL, Pi, A->c1, A->c1);
        if (x2) channel_sums(a + A->c1, x2, NULL, Pi, A->c2, A->c2);
        for (int g = 0; g < A->groups; g++) {
            double s = 0.0;
            for (int c = g * cg; c < (g + 1) * cg; c++) s += a[c];
            const float mean = (float)(s / ((double)Pi * cg));
            for (int c = g * cg; c < (g + 1) * cg; c++) b[c] = mean;
        }
        channel_sums(a, x1, b, Pi, A->c1, A->c1);
        if (x2) channel_sums(a + A->c1, x2, b + A->c1, Pi, A->c2, A->c2);
        for (int g = 0; g < A->groups; g++) {
            double s = 0.0;
            for (int c = g * cg; c < (g + 1) * cg; c++) s += a[c];
            const float rstd = 1.0f / sqrtf((float)(s / ((double)Pi * cg)) + A->eps);
            /* ((x - mean) * rstd * gamma + beta) * (1 + scale) + shift = a * x + b; the two loops keep the
             * test on scale out of the vectorised one */
            if (io->scale)
                for (int c = g * cg; c < (g + 1) * cg; c++) {
                    const float k = 1.0f + io->scale[c], gs = A->gamma[c] * rstd;
                    a[c] = gs * k;
                    b[c] = (A->beta[c] - b[c] * gs) * k + io->shift[c];
                }
            else
                for (int c = g * cg; c < (g + 1) * cg; c++) {
                    const float gs = A->gamma[c] * rstd;
                    a[c] = gs;
                    b[c] = A->beta[c] - b[c] * gs;
                }
        }
    }
    /* one call per mode, so that each is compiled with its mode fixed */
#define ACT(mode)                                                                                         \
    do {                                                                                                  \
        act_plane(pad, Wp, C, 0, x1, A->c1, hi, wi, A->upsample, a, b, mode);                           \
        if (x2) act_plane(pad, Wp, C, A->c1, x2, A->c2, hi, wi, A->upsample, a + A->c1, b + A->c1, mode); \
    } while (0)
    if (A->groups <= 0)
        ACT(COPY);
    else if (A->no_act)
        ACT(AFFINE);
    else
        ACT(SILU);
#undef ACT
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

/* Check A and fill in its plan. Returns 0, or -1 if an argument is out of range (k not a multiple of
 * 8 or over 2048, channels not a multiple of groups, odd size with upsample, a stride other than 1 or
 * 2, stride 2 with upsample or a skip, a 1x1 with stride or upsample, a missing weight, a scale
 * without a shift or the reverse, k < 8 with a skip). */
static int plan_conv(const conv_args *A, conv_plan *pl) {
    const int C = A->c1 + A->c2, K = A->k, st = A->stride;
    if (K <= 0 || (K % 8 && K > 8) || K / 8 > MAX_CHUNKS || C <= 0 || A->h <= 0 || A->w <= 0 || A->c1 <= 0 || A->c2 < 0 ||
        A->sc1 < 0 || A->sc2 < 0 || (A->sc2 && !A->sc1) || (A->sc1 && !(A->skip_weight && A->skip_bias)) ||
        !A->weight || !A->bias || (A->groups > 0 && (C % A->groups || !A->gamma || !A->beta)) ||
        (!A->scale != !A->shift) || (A->upsample && (A->h % 2 || A->w % 2)) || (st != 1 && st != 2) ||
        (st == 2 && (A->upsample || A->sc1)) || (A->kernel1x1 && (st != 1 || A->upsample)) ||
        (K < 8 && A->sc1))
        return -1;
    pl->C = C, pl->P = A->h * A->w, pl->Wp = A->w * st + 2, pl->Hp = A->h * st + 2;
    pl->taps = A->kernel1x1 ? 1 : 9;
    for (int t = 0; t < 9; t++) pl->off[t] = ((t / 3) * pl->Wp + t % 3) * C;
    if (A->kernel1x1) pl->off[0] = pl->off[4]; /* the centre tap */
    /* a 1x1 convolution of a plain input reads it where it is */
    pl->direct = A->kernel1x1 && A->groups <= 0 && A->c2 == 0;
    pl->pad_len = (pl->direct ? 0 : (size_t)pl->Hp * pl->Wp * C) + 2 * (size_t)C + K;
    pl->chunks = 0; /* none for K < 8: conv_narrow */
    if (K >= 8)
        for (int k0 = 0; k0 < K; k0 += 8 * pl->ob[pl->chunks++]) choose_tile(K - k0, pl->P, &pl->ob[pl->chunks], &pl->blocks[pl->chunks]);
    return 0;
}

/* hsum of v's 8 lanes */
static inline float hsum256(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

/* The A->k (< 8) output channels of one image, each pixel's as dot products over its taps' inputs, 8
 * input channels per FMA, with weights (k, taps, C): with one to three output channels (an image's),
 * 8-wide tiles would spend most of their FMAs on padding, and the output would need trimming. Four pixels of a row at a time, so that four accumulator
 * chains are in flight (one pixel at a time, or four with their accumulators in an array, measured
 * 2.3x slower in place). src and src_off as in conv_image. */
static void conv_narrow(const conv_args *A, const conv_plan *pl, const image_io *io, const float *src,
                        const int *src_off) {
    const int C = pl->C, W = A->w, st = A->stride, taps = pl->taps, C8 = C / 8 * 8;
    const size_t step = (size_t)(pl->direct ? 1 : st) * C; /* from a pixel's input to the next one's */
    for (int y = 0; y < A->h; y++) {
        const float *row = pl->direct ? src + (size_t)y * W * C : src + (size_t)y * st * pl->Wp * C;
        float *out = io->y + (size_t)y * W * A->k;
        int x0 = 0;
        for (; x0 + 4 <= W; x0 += 4) /* four pixels: four independent accumulator chains */
            for (int j = 0; j < A->k; j++) {
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                float r0 = 0.0f, r1 = 0.0f, r2 = 0.0f, r3 = 0.0f;
                const float *w = A->weight + (size_t)j * taps * C;
                for (int t = 0; t < taps; t++, w += C) {
                    const float *x = row + x0 * step + src_off[t];
                    for (int c = 0; c < C8; c += 8) {
                        const __m256 wv = _mm256_loadu_ps(w + c);
                        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + c), wv, a0);
                        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + step + c), wv, a1);
                        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + 2 * step + c), wv, a2);
                        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + 3 * step + c), wv, a3);
                    }
                    for (int c = C8; c < C; c++) {
                        r0 += x[c] * w[c], r1 += x[step + c] * w[c];
                        r2 += x[2 * step + c] * w[c], r3 += x[3 * step + c] * w[c];
                    }
                }
                float *o = out + (size_t)x0 * A->k + j;
                o[0] = A->bias[j] + hsum256(a0) + r0;
                o[A->k] = A->bias[j] + hsum256(a1) + r1;
                o[2 * A->k] = A->bias[j] + hsum256(a2) + r2;
                o[3 * A->k] = A->bias[j] + hsum256(a3) + r3;
            }
        for (; x0 < W; x0++)
            for (int j = 0; j < A->k; j++) {
                __m256 a0 = _mm256_setzero_ps();
                float r0 = 0.0f;
                const float *w = A->weight + (size_t)j * taps * C;
                for (int t = 0; t < taps; t++, w += C) {
                    const float *x = row + x0 * step + src_off[t];
                    for (int c = 0; c < C8; c += 8)
                        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + c), _mm256_loadu_ps(w + c), a0);
                    for (int c = C8; c < C; c++) r0 += x[c] * w[c];
                }
                out[(size_t)x0 * A->k + j] = A->bias[j] + hsum256(a0) + r0;
            }
    }
}

/* Convolve one image. scratch holds pl->pad_len floats. */
static void conv_image(const conv_args *A, const conv_plan *pl, const image_io *io, float *scratch) {
    const int C = pl->C, K = A->k, W = A->w, P = pl->P, st = A->stride, Wp = pl->Wp;
    const int S = A->sc1 + A->sc2;
    float *pad = scratch, *a = pad + (pl->direct ? 0 : (size_t)pl->Hp * Wp * C), *b = a + C;
    float *zeros = b + C;                     /* the bias of the skip's second input */
    if (A->sc2) memset(zeros, 0, K * sizeof(float));
    const float *src = pad;
    int src_off[9];
    memcpy(src_off, pl->off, sizeof src_off);
    if (pl->direct) { /* pixel p at x1 + p * C: as a 1 x 1 "padded" image with no border */
        src = io->x1, src_off[0] = 0;
        border_pad = NULL;
    } else {
        if (pl->taps == 9)
            zero_border(pad, pl->Hp, Wp, C);
        else if (!border_intact(pad, pl->Hp, Wp, C)) /* the interior is in another place than the border's */
            border_pad = NULL;
        prepare(A, io, pad, a, b);
    }
    if (K < 8) {
        conv_narrow(A, pl, io, src, src_off);
        return;
    }
    const int off0[1] = {0};
    for (int j = 0, k0 = 0; j < pl->chunks; k0 += 8 * pl->ob[j++]) {
        const int ob = pl->ob[j], blocks = pl->blocks[j];
        for (int blk = 0, p0 = 0; blk < blocks; blk++) {
            const int p1 = (int)((long)P * (blk + 1) / blocks); /* P = 16 -> 6, 5, 5 */
            const float *px[TILE_MAX_PIXELS], *rp[TILE_MAX_PIXELS];
            float *out[TILE_MAX_PIXELS];
            const tile_fn tile = TILES[ob - 1][p1 - p0 - 1];
            for (int p = p0; p < p1; p++) {
                out[p - p0] = io->y + (size_t)p * K + k0;
                rp[p - p0] = io->res ? io->res + (size_t)p * K + k0 : out[p - p0];
            }
            if (S) { /* the 1x1 skip convolution first, into the output; then added below */
                for (int p = p0; p < p1; p++) px[p - p0] = io->s1 + (size_t)p * A->sc1;
                tile(px, A->skip_weight + k0, A->sc1, K, 1, off0, A->skip_bias + k0, out, NULL);
                if (A->sc2) {
                    for (int p = p0; p < p1; p++) px[p - p0] = io->s2 + (size_t)p * A->sc2;
                    tile(px, A->skip_weight + (size_t)A->sc1 * K + k0, A->sc2, K, 1, off0, zeros, out,
                         (const float *const *)out);
                }
            }
            if (pl->direct)
                for (int p = p0; p < p1; p++) px[p - p0] = src + (size_t)p * C;
            else
                for (int p = p0; p < p1; p++) px[p - p0] = src + ((size_t)(p / W) * st * Wp + (p % W) * st) * C;
            tile(px, A->weight + k0, C, K, pl->taps, src_off, A->bias + k0, out, (io->res || S) ? rp : NULL);
            p0 = p1;
        }
    }
}

/* Attention of one image: qkv is (P, 3C), per pixel [q | k | v] with head h at channels h*d..h*d+d-1
 * of each; y (P, C) gets softmax(q k^T / sqrt(d)) v per head. s holds P8 + P8 * d floats (P8: P
 * rounded up to 8): one row of scores, then the head's keys transposed (d, P8), so that a query's
 * scores are vector FMAs over the keys rather than one horizontal sum per key. */
static void attn_image(const float *qkv, float *y, int P, int heads, int d, float *s) {
    const int C = heads * d, ld = 3 * C, P8 = (P + 7) / 8 * 8;
    const float scale = 1.0f / sqrtf((float)d);
    float *kt = s + P8;
    for (int h = 0; h < heads; h++) {
        for (int e = 0; e < d; e++) {
            for (int j = 0; j < P; j++) kt[(size_t)e * P8 + j] = qkv[(size_t)j * ld + C + h * d + e] * scale;
            for (int j = P; j < P8; j++) kt[(size_t)e * P8 + j] = 0.0f;
        }
        for (int i = 0; i < P; i++) {
            const float *q = qkv + (size_t)i * ld + h * d;
            for (int j = 0; j < P8; j += 8) {
                __m256 acc = _mm256_setzero_ps();
                for (int e = 0; e < d; e++) acc = _mm256_fmadd_ps(_mm256_set1_ps(q[e]), _mm256_loadu_ps(kt + (size_t)e * P8 + j), acc);
                _mm256_storeu_ps(s + j, acc);
            }
            float top = -INFINITY;
            for (int j = 0; j < P; j++) top = s[j] > top ? s[j] : top;
            float total = 0.0f;
            int j = 0;
            for (; j + 8 <= P; j += 8) {
                const __m256 ex = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(top)));
                _mm256_storeu_ps(s + j, ex);
            }
            for (; j < P; j++) s[j] = expf(s[j] - top);
            for (j = 0; j < P; j++) total += s[j];
            const float inv = 1.0f / total;
            float *o = y + (size_t)i * C + h * d;
            for (int e = 0; e < d; e++) o[e] = 0.0f;
            for (j = 0; j < P; j++) {
                const float *v = qkv + (size_t)j * ld + 2 * C + h * d;
                const float wj = s[j] * inv;
                int e = 0;
                for (; e + 8 <= d; e += 8)
                    _mm256_storeu_ps(o + e, _mm256_fmadd_ps(_mm256_set1_ps(wj), _mm256_loadu_ps(v + e), _mm256_loadu_ps(o + e)));
                for (; e < d; e++) o[e] += wj * v[e];
            }
        }
    }
}

/* A network for ddsm_run: a list of layers reading and writing slots. */
enum { OP_CONV = 0, OP_ATTN = 1 };

typedef struct {
    int kind;
    conv_args a;                  /* OP_CONV: the layer. OP_ATTN: a.h, a.w give the pixels */
    int heads, head_dim;          /* OP_ATTN: qkv from slot x1 ((P, 3C)), the result to slot y ((P, C)) */
    int x1, x2, res, s1, s2, y;   /* slot indices of the layer's tensors (see image_io); -1: none */
} op_t;

/* A slot holds `len` floats per image: an external (N, len) tensor at ptr, or, with ptr NULL, a
 * per-thread arena region at `off` (the caller lays the arena out and may reuse regions). */
typedef struct {
    float *ptr;
    long off, len;
} slot_t;

static float *slot_at(const slot_t *slots, int s, int i, float *arena) {
    if (s < 0) return NULL;
    return slots[s].ptr ? slots[s].ptr + (size_t)i * slots[s].len : arena + slots[s].off;
}

/* Run the n_ops layers on each of n images, each image through all of them in turn with its
 * activations in the thread's arena (arena_len floats), where they stay in cache. (Taking a few images
 * through each layer together, to read its weights once for them, measured no faster.) Returns 0, or
 * -1 if a layer's arguments are out of range or memory ran out. */
int ddsm_run(const op_t *ops, int n_ops, const slot_t *slots, int n_slots, int n, long arena_len) {
    if (n_ops <= 0 || n < 0 || arena_len < 0) return -1;
    conv_plan *plans = malloc(sizeof *plans * n_ops);
    if (!plans) return -1;
    size_t need = 0;
    for (int o = 0; o < n_ops; o++) {
        const op_t *op = &ops[o];
        const int ids[6] = {op->x1, op->x2, op->res, op->s1, op->s2, op->y};
        int bad = op->x1 < 0 || op->y < 0;
        for (int j = 0; j < 6; j++) bad |= ids[j] >= n_slots || (ids[j] >= 0 && slots[ids[j]].ptr == NULL &&
                                                                   slots[ids[j]].off + slots[ids[j]].len > arena_len);
        if (op->kind == OP_CONV) {
            const conv_args *a = &op->a;
            bad = bad || (op->x2 >= 0) != (a->c2 > 0) || (op->s1 >= 0) != (a->sc1 > 0) ||
                  (op->s2 >= 0) != (a->sc2 > 0) || (op->res >= 0 && (a->sc1 > 0 || a->k < 8)) ||
                  plan_conv(a, &plans[o]);
            if (!bad && plans[o].pad_len > need) need = plans[o].pad_len;
        } else if (op->kind == OP_ATTN) {
            const size_t P = (size_t)op->a.h * op->a.w;
            bad = bad || op->heads <= 0 || op->head_dim <= 0 || P == 0;
            const size_t P8 = (P + 7) / 8 * 8, scores = P8 + P8 * (size_t)op->head_dim;
            if (!bad && scores > need) need = scores;
        } else {
            bad = 1;
        }
        if (bad) {
            free(plans);
            return -1;
        }
    }
    int failed = 0;
    #pragma omp parallel
    {
        float *buf = get_scratch(need + (size_t)arena_len);
        if (!buf) {
            #pragma omp atomic write
            failed = 1;
        } else {
            float *arena = buf + need;
            /* images handed out dynamically: they finish unevenly when the other core is busy */
            #pragma omp for schedule(dynamic, 2)
            for (int i = 0; i < n; i++)
                for (int o = 0; o < n_ops; o++) {
                    const op_t *op = &ops[o];
                    if (op->kind == OP_ATTN) {
                        border_pad = NULL;
                        attn_image(slot_at(slots, op->x1, i, arena), slot_at(slots, op->y, i, arena),
                                   op->a.h * op->a.w, op->heads, op->head_dim, buf);
                        continue;
                    }
                    const conv_args *A = &op->a;
                    const image_io io = {slot_at(slots, op->x1, i, arena), slot_at(slots, op->x2, i, arena),
                                         slot_at(slots, op->res, i, arena), slot_at(slots, op->s1, i, arena),
                                         slot_at(slots, op->s2, i, arena),
                                         A->scale ? A->scale + (size_t)i * A->mod_stride : NULL,
                                         A->shift ? A->shift + (size_t)i * A->mod_stride : NULL,
                                         slot_at(slots, op->y, i, arena)};
                    conv_image(A, &plans[o], &io, buf);
                }
        }
    }
    free(plans);
    return failed ? -1 : 0;
}
