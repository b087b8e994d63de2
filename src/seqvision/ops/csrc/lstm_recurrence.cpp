// The sequential part of BiLSTM2D: the LSTM recurrences of K directions, forward and backward.
//
// The input gates of every direction come precomputed by one GEMM as xg (B, H, W, K, 4D) and are read in
// place: direction k walks the columns (axis 0, sequences of length H, batch B*W) or the rows (axis 1,
// length W, batch B*H), forwards or reversed, and writes its hidden states straight into out
// (B, H, W, K*D) at channels [k*D, (k+1)*D). No permuted copies of the activations are made.
//
// Sequences are independent, so the work is split into tiles of RT sequences of one direction, and each
// thread runs its tiles from the first step to the last on its own: no barrier per step, and a tile's
// h, c and gates (RT x 4D) stay in L1 while its h @ W_hh^T runs as a register-blocked kernel. Tiles are
// numbered direction-fastest, so each thread's contiguous share holds every direction over its part of
// the images rather than some of the directions over all of them, and consecutive tiles read the gates of
// the same pixels (measured faster; see the README).
//
// At the end, the Sequencer block's other fused loops: the MLP's bias + GELU (bias_gelu, gelu_backward_bias), and
// LayerNorm together with the bias add that starts the next GEMM's accumulator (layer_norm_seed); and the
// inference GEMM built on the recurrence's matmul kernel (gemm_nt), and its int8 counterpart (qgemm_nt).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

// Sequences per tile (RT) and vectors per row block (VB): RT x VB accumulators, sized to the vector
// registers. AVX-512 (32 zmm): 6 x 4 of 16 floats. Against 8 x 3, 4 x 6 and 12 x 2 on an Intel Xeon, 8 x 3
// ran the recurrence alone 5-10% faster at batch 1 (tiles of 8 divide the 16 or 32 sequences of an image) and
// the batch-16 backward 3-5% faster, but its forward 1-3% slower; whole Sequencer2D-S passes were level
// (inference at batch 1 and 16, training at 16: 0.998-1.006x, alternating rounds). AVX2 (16 ymm): 4 x 3 of 8 floats,
// 12 accumulators beside 3 weight vectors and the broadcast; it beat 6 x 2 (the same 12 accumulators, one
// load less per 12 FMAs, and tiles of 4 divide the 16 or 32 sequences of a batch-1 image) by 7-14% on an
// AMD EPYC (Zen 3), and 4 x 2, 5 x 2, 8 x 1 and 3 x 4 too. Baseline SSE (16 xmm) takes the AVX2 shape.
// SEQVISION_AVX512_TILES gives a narrower build the AVX-512 shape (GCC splits the 64-byte vectors), so that
// a machine without AVX-512 can check that shape's tiling, padding and partial sums against the reference.
#if defined(__AVX512F__) || defined(SEQVISION_AVX512_TILES)
constexpr int64_t RT = 6;
constexpr int VB = 4;
constexpr int VL = 16;
#elif defined(__AVX2__)
constexpr int64_t RT = 4;
constexpr int VB = 3;
constexpr int VL = 8;
#else
constexpr int64_t RT = 4;
constexpr int VB = 3;
constexpr int VL = 4;
#endif
// VL floats; element-aligned so that pointer reads compile to unaligned vector loads on any ISA.
typedef float vec __attribute__((vector_size(VL * 4), aligned(4)));
// Rows of W_hh are padded to whole vectors and no further: padding D = 24 to 16 floats gave the AVX2
// backward's matmul a fourth block of zeros (5% of that backward).
constexpr int64_t PAD = VL;

// x * P(x^2) / Q(x^2) with x clamped to [-lim, lim], coefficients from the highest power down: the form of
// Eigen's float approximations of tanh and erf below. FMAs and one division, inlined, so the loops that call
// it vectorise at the machine's full width instead of calling a vector expf. The clamp is written with
// comparisons, not fmin/fmax, so that a NaN passes through (fmin drops it).
template <size_t NP, size_t NQ>
inline float odd_rational(float x, float lim, const float (&p)[NP], const float (&q)[NQ]) {
  x = x > lim ? lim : x;
  x = x < -lim ? -lim : x;
  const float x2 = x * x;
  float pv = p[0], qv = q[0];
  for (size_t i = 1; i < NP; ++i) pv = pv * x2 + p[i];
  for (size_t i = 1; i < NQ; ++i) qv = qv * x2 + q[i];
  return x * pv / qv;
}

// tanh, |error| < 3e-7.
constexpr float TANH_P[] = {-2.76076847742355e-16f, 2.00018790482477e-13f, -8.60467152213735e-11f,
                            5.12229709037114e-08f, 1.48572235717979e-05f, 6.37261928875436e-04f,
                            4.89352455891786e-03f};
constexpr float TANH_Q[] = {1.19825839466702e-06f, 1.18534705686654e-04f, 2.26843463243900e-03f,
                            4.89352518554385e-03f};
inline float tanh_(float x) { return odd_rational(x, 7.90531110763549805f, TANH_P, TANH_Q); }
inline float sigm(float x) { return 0.5f + 0.5f * tanh_(0.5f * x); }

// erf, |error| < 5e-7 against double erf, for GELU below.
constexpr float ERF_P[] = {-2.72614225801306e-10f, 2.77068142495902e-08f, -2.10102402082508e-06f,
                           -5.69250639462346e-05f, -7.34990630326855e-04f, -2.95459980854025e-03f,
                           -1.60960333262415e-02f};
constexpr float ERF_Q[] = {-1.45660718464996e-05f, -2.13374055278905e-04f, -1.68282697438203e-03f,
                           -7.37332916720468e-03f, -1.42647390514189e-02f};
inline float erf_(float x) { return odd_rational(x, 4.f, ERF_P, ERF_Q); }

// exp, relative error < 2e-7: Cody-Waite reduction by ln 2 and Cephes' polynomial, 2^n built in the exponent
// bits; inlined for the same reason as above (GCC calls a scalar expf without -ffast-math). n is rounded by
// adding and subtracting 1.5 * 2^23, which vectorises on every ISA (floorf needs SSE4.1). NaN stays NaN.
inline float exp_(float x) {
  x = x < -87.f ? -87.f : x;
  x = x > 88.f ? 88.f : x;
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = p * r + c;
  const int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return (p * r * r + r + 1.f) * scale;
}

// What the elementwise kernels at the end read and write: contiguous float32 CPU tensors.
inline bool cpu_float(const torch::Tensor& t) {
  return t.is_contiguous() && t.scalar_type() == torch::kFloat && t.device().is_cpu();
}

// Columns per panel of packed weights: one row block of the kernel below.
constexpr int64_t PW = VB * VL;

// out[r, 0:VL*V] (+)= in[r, 0:k] @ w[0:k, 0:VL*V] for R rows of in (row-major, k wide); w row-major with row
// stride ldw. ACC adds onto out.
template <int64_t R, int V, bool ACC = false>
inline void block(const float* in, int64_t k, const float* w, int64_t ldw, float* out, int64_t ldo) {
  vec acc[R][V];
  for (int64_t r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = ACC ? *(const vec*)(out + r * ldo + VL * v) : vec{};
  for (int64_t d = 0; d < k; ++d) {
    vec wv[V];
    for (int v = 0; v < V; ++v) wv[v] = *(const vec*)(w + d * ldw + VL * v);
    for (int64_t r = 0; r < R; ++r) {
      const float x = in[r * k + d];
      for (int v = 0; v < V; ++v) acc[r][v] += x * wv[v];
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) *(vec*)(out + r * ldo + VL * v) = acc[r][v];
}

// out (R, n) (+)= in (R, k) @ w (k, n), in and out row-major (out's row stride ldo); w packed by pack_panels
// in panels of V vectors (n a multiple of PAD).
template <int64_t R, int V, bool ACC = false>
void panels_matmul(const float* in, int64_t k, const float* w, int64_t n, float* out, int64_t ldo) {
  for (int64_t j = 0; j < n; j += V * VL) {
    const int64_t width = std::min<int64_t>(V * VL, n - j);
    const float* wj = w + j * k;
    if (width == V * VL) block<R, V, ACC>(in, k, wj, width, out + j, ldo);
    else if (V > 3 && width == 3 * VL) block<R, 3, ACC>(in, k, wj, width, out + j, ldo);
    else if (V > 2 && width == 2 * VL) block<R, 2, ACC>(in, k, wj, width, out + j, ldo);
    else block<R, 1, ACC>(in, k, wj, width, out + j, ldo);
  }
}

// out (RT, n) = in (RT, k) @ w (k, n) for a tile, in and out row-major; w packed by pack_panels (n a multiple
// of PAD).
inline void tile_matmul(const float* in, int64_t k, const float* w, int64_t n, float* out) {
  panels_matmul<RT, VB>(in, k, w, n, out, n);
}

inline int64_t pad_vl(int64_t n) { return (n + PAD - 1) / PAD * PAD; }

// w (Kg, rows, cols) -> (Kg, rows, n = pad_vl(cols)), zero columns added and each matrix stored in panels:
// columns [j, j + pw) of every row, row after row, at offset j * rows (the last panel may be narrower). A
// row block of tile_matmul then streams one contiguous panel, where the rows of a row-major W lie a whole
// row apart (1.5 KB with D = 96: few L1 sets). The forward recurrence measured 4-18% faster (AMD EPYC,
// Zen 3, AVX2), with the same sums in the same order.
torch::Tensor pack_panels(const torch::Tensor& w, int64_t pw = PW) {
  const int64_t Kg = w.size(0), rows = w.size(1), cols = w.size(2), n = pad_vl(cols);
  auto padded = torch::zeros({Kg, rows, n}, w.options());
  padded.narrow(2, 0, cols).copy_(w);
  auto packed = torch::empty({Kg, rows * n}, w.options());
  for (int64_t j = 0; j < n; j += pw) {
    const int64_t width = std::min(pw, n - j);
    packed.narrow(1, j * rows, rows * width).view({Kg, rows, width}).copy_(padded.narrow(2, j, width));
  }
  return packed.view({Kg, rows, n});
}

// The next step's input gates of a tile sit at scattered pixels, a pattern the hardware prefetcher does
// not follow: ask for them while this step's matmul runs.
inline void prefetch_rows(const float* x, const int64_t* start, int64_t rows, int64_t shift, int64_t K,
                          int64_t slot, int64_t G) {
  for (int64_t r = 0; r < rows; ++r) {
    const char* p = (const char*)(x + ((start[r] + shift) * K + slot) * G);
    for (int64_t b = 0; b < G * 4; b += 64) __builtin_prefetch(p + b);
  }
}

// One LSTM step of one sequence over its D channels: the gates' three parts g (h_{t-1} W_hh^T), xr (x_t W_ih^T)
// and br (bias) -> c (in place), h and the output row; with SAVE, the activated gates into act for backward.
// Inference writes no gates back: four stores of the cell's seven.
template <bool SAVE>
inline void cell(const float* g, const float* xr, const float* br, int64_t D, float* cr, float* hr, float* orow,
                 float* act) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    const float i = sigm(g[d] + xr[d] + br[d]), f = sigm(g[D + d] + xr[D + d] + br[D + d]);
    const float gg = tanh_(g[2 * D + d] + xr[2 * D + d] + br[2 * D + d]);
    const float og = sigm(g[3 * D + d] + xr[3 * D + d] + br[3 * D + d]);
    if (SAVE) act[d] = i, act[D + d] = f, act[2 * D + d] = gg, act[3 * D + d] = og;
    const float cn = f * cr[d] + i * gg;
    cr[d] = cn;
    hr[d] = og * tanh_(cn);
    orow[d] = hr[d];
  }
}

struct Geometry {
  int64_t B, H, W, K, D;
  std::vector<int64_t> axis, reverse;  // per direction in this group
  int64_t T() const { return axis[0] == 0 ? H : W; }
  int64_t N() const { return axis[0] == 0 ? B * W : B * H; }
  // The flat (b, row, col) pixel of sequence n of direction k at step t is start(k, n) + s * stride(k),
  // s the step in reading order: the columns (axis 0: n = b * W + col, the step is the row) or the rows
  // (axis 1: n = b * H + row, the step is the column).
  int64_t start(int64_t k, int64_t n) const { return axis[k] == 0 ? n / W * H * W + n % W : n * W; }
  int64_t stride(int64_t k) const { return axis[k] == 0 ? W : 1; }
  int64_t step(int64_t k, int64_t t) const { return reverse[k] ? T() - 1 - t : t; }
};

Geometry geometry(const torch::Tensor& xg, int64_t D, const std::vector<int64_t>& axis,
                  const std::vector<int64_t>& reverse) {
  Geometry g{xg.size(0), xg.size(1), xg.size(2), xg.size(3), D, axis, reverse};
  for (size_t k = 1; k < axis.size(); ++k)
    TORCH_CHECK(g.H == g.W || axis[k] == axis[0], "directions of both axes step together only when H == W");
  return g;
}

}  // namespace

// W_hh (K, 4D, D) -> (K, D, pad_vl(4D)), the layout lstm_forward reads: h @ W_hh^T takes rows of the
// transpose, zero columns pad them to whole vectors, stored in panels (pack_panels). Inference keeps it
// across calls (the weights are fixed).
torch::Tensor pack_recurrent(torch::Tensor w_hh) {
  TORCH_CHECK(w_hh.dim() == 3 && w_hh.size(1) == 4 * w_hh.size(2), "W_hh must be (K, 4D, D), got ", w_hh.sizes());
  return pack_panels(w_hh.transpose(1, 2));
}

// xg: (B, H, W, K, 4D) input projections without bias; bias: (K, 4D), b_ih + b_hh, added in the cell
// (so the projection GEMM needs no bias copy); w_t: pack_recurrent(W_hh) of the Kg directions of this
// group, whose xg/out/bias slots are `slots`; out: (B, H, W, K*D) written for those slots.
// With `save`, returns cs (Kg, T, N, D) and activated gates (Kg, T, N, 4D) for backward, which reads the
// hidden states from out.
std::vector<torch::Tensor> lstm_forward(torch::Tensor xg, torch::Tensor bias, torch::Tensor w_t, torch::Tensor out,
                                        std::vector<int64_t> slots, std::vector<int64_t> axis,
                                        std::vector<int64_t> reverse, bool save) {
  TORCH_CHECK(xg.dim() == 5 && xg.is_contiguous() && out.is_contiguous(), "xg (B,H,W,K,4D) and out contiguous");
  TORCH_CHECK(xg.scalar_type() == torch::kFloat && w_t.scalar_type() == torch::kFloat, "float32 only");
  TORCH_CHECK(xg.device().is_cpu() && w_t.device().is_cpu() && out.device().is_cpu(), "CPU tensors only");
  const int64_t Kg = (int64_t)slots.size(), G = xg.size(4), D = G / 4, Gp = pad_vl(G);
  TORCH_CHECK(G % 4 == 0 && w_t.dim() == 3 && w_t.size(0) == Kg && w_t.size(1) == D && w_t.size(2) == Gp &&
              w_t.is_contiguous(), "w_t must be pack_recurrent(W_hh), contiguous (", Kg, ", ", D, ", ", Gp,
              "), got ", w_t.sizes());
  TORCH_CHECK(bias.is_contiguous() && bias.size(0) == xg.size(3) && bias.size(1) == G, "bias must be (K, 4D)");
  Geometry geo = geometry(xg, D, axis, reverse);
  const int64_t T = geo.T(), N = geo.N(), K = geo.K, OW = out.size(3), tiles = (N + RT - 1) / RT;
  auto opts = xg.options();
  torch::Tensor cs, acts;
  if (save) {
    cs = torch::empty({Kg, T, N, D}, opts);
    acts = torch::empty({Kg, T, N, G}, opts);
  }
  const float *x = xg.data_ptr<float>(), *bp = bias.data_ptr<float>(), *wp = w_t.data_ptr<float>();
  float* o = out.data_ptr<float>();
  float* csp = save ? cs.data_ptr<float>() : nullptr;
  float* ap = save ? acts.data_ptr<float>() : nullptr;
  at::parallel_for(0, Kg * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> h(RT * D), c(RT * D), gates(RT * Gp);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t k = tile % Kg, n0 = tile / Kg * RT, rows = std::min(RT, N - n0);
      const float* br = bp + slots[k] * G;
      int64_t start[RT];
      for (int64_t r = 0; r < rows; ++r) start[r] = geo.start(k, n0 + r);
      std::fill(h.begin(), h.end(), 0.f);
      std::fill(c.begin(), c.end(), 0.f);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t shift = geo.step(k, t) * geo.stride(k);
        if (t + 1 < T) prefetch_rows(x, start, rows, geo.step(k, t + 1) * geo.stride(k), K, slots[k], G);
        tile_matmul(h.data(), D, wp + k * D * Gp, Gp, gates.data());  // (RT, D) @ (D, Gp)
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t px = start[r] + shift;
          const float* xr = x + (px * K + slots[k]) * G;
          const float* g = gates.data() + r * Gp;
          float *cr = c.data() + r * D, *hr = h.data() + r * D, *orow = o + px * OW + slots[k] * D;
          if (save) {
            const int64_t at_t = (k * T + t) * N + n0 + r;
            cell<true>(g, xr, br, D, cr, hr, orow, ap + at_t * G);
            std::copy(cr, cr + D, csp + at_t * D);
          } else {
            cell<false>(g, xr, br, D, cr, hr, orow, nullptr);
          }
        }
      }
    }
  });
  return {cs, acts};
}

// acc (G, Dp) += dg (RT, G)^T @ hp (RT, Dp): one step's share of grad W_hh for a tile, Dp a multiple of VL.
// The tile's RT rows of h stay in registers for a column block while every gate row streams past.
inline void outer_acc(const float* dg, int64_t G, const float* hp, int64_t Dp, float* acc) {
  for (int64_t v = 0; v < Dp; v += VL) {
    vec hv[RT];
    for (int64_t r = 0; r < RT; ++r) hv[r] = *(const vec*)(hp + r * Dp + v);
    for (int64_t g = 0; g < G; ++g) {
      vec s = *(vec*)(acc + g * Dp + v);
      for (int64_t r = 0; r < RT; ++r) s += dg[r * G + g] * hv[r];
      *(vec*)(acc + g * Dp + v) = s;
    }
  }
}

// Tiles per work item of the backward: each item sums its gradients of W_hh and bias over its tiles, and the
// items' partial sums are added in a fixed order, so the result does not depend on the thread count.
constexpr int64_t TILES_PER_ITEM = 8;
// grad W_hh is summed in the kernel, step by step, while a direction's (4D, D) accumulator fits in this many
// bytes (L1 or close to it); a larger one is a GEMM at the end (grad_w_hh_gemm). AMD EPYC (Zen 3, 32 KB
// L1), AVX2, backward of one BiLSTM2D, 2 threads, in the kernel against the GEMM: 9-33% faster at D <= 32
// (but for D = 24 on 32x32, 7% slower), within 10% either way at D = 48 and 64 depending on the grid (7x7,
// 16x16, 32x32), 9% slower at D = 96. Intel Xeon (48 KB L1), batch 16 on the same grids: the AVX2 build
// 1-43% faster at D <= 48, 1-11% slower at D = 64 and 96; the AVX-512 build 10-40% faster at D <= 48 and
// 4-12% faster at D = 64 (the first stage of sequencer2d_l_d4_3x) and 1-4% at D = 96 (under 0.5% of a
// Sequencer2D-S training step), too little to keep a second threshold for.
constexpr int64_t GRAD_W_IN_KERNEL_BYTES = 48 << 10;

// grad W_hh (4D, D) of the direction in `slot` = sum over pixels of its gate gradients (grad_xg) times h one
// step earlier in its order (out), read where the backward left them: one GEMM over the flat pixel range
// against itself shifted by one step (s pixels: a row down the columns, one pixel along the rows), minus the
// pairs that shift joins across the start of a sequence (the first step of each run of L pixels).
torch::Tensor grad_w_hh_gemm(const torch::Tensor& grad_xg, const torch::Tensor& out, int64_t slot, bool columns,
                             bool reverse) {
  const int64_t H = grad_xg.size(1), W = grad_xg.size(2), K = grad_xg.size(3), G = grad_xg.size(4), D = G / 4;
  if ((columns ? H : W) == 1) return torch::zeros({G, D}, out.options());  // one step: no h_{t-1}
  const int64_t s = columns ? W : 1, L = columns ? H * W : W;
  auto g = grad_xg.view({-1, K, G}).select(1, slot);      // (B, H, W, K, G) -> (B*H*W, G), rows K*G apart
  auto h = out.view({-1, out.size(3)}).narrow(1, slot * D, D);  // (B, H, W, K*D) -> (B*H*W, D), rows K*D apart
  const int64_t P = g.size(0);
  // h_{t-1} sits s pixels before (forward) or after (reverse) the pixel of step t
  auto gw = at::mm(g.narrow(0, reverse ? 0 : s, P - s).t(), h.narrow(0, reverse ? s : 0, P - s));
  auto gr = g.view({-1, L, G}), hr = h.view({-1, L, D});  // (B*H*W, .) -> (runs, L, .): runs of sequences
  const int64_t R = gr.size(0);
  // each run's first step (the first s pixels forward, the last s reversed) against the neighbouring run's end
  auto a = reverse ? gr.narrow(0, 0, R - 1).narrow(1, L - s, s) : gr.narrow(0, 1, R - 1).narrow(1, 0, s);
  auto b = reverse ? hr.narrow(0, 1, R - 1).narrow(1, 0, s) : hr.narrow(0, 0, R - 1).narrow(1, L - s, s);
  return gw.sub_(at::mm(a.reshape({-1, G}).t(), b.reshape({-1, D})));
}

// Backpropagation through time for one group. grad_out: (B, H, W, K*D); grad_xg: (B, H, W, K, 4D), written
// for this group's slots; out: the forward's output (B, H, W, K*D), whose hidden states the forward therefore
// does not save again. Returns grad W_hh (Kg, 4D, D) and grad bias (Kg, 4D).
// grad W_hh = sum over t >= 1 of dgates_t^T @ h_{t-1}, in the kernel while both are in L1 (see
// GRAD_W_IN_KERNEL_BYTES). The reads of each step are prefetched during the step before: the saved gates
// and cells (walked backwards in time, which the hardware prefetcher did not follow) and grad_out and
// grad_xg at scattered pixels; 16-29% of this backward on the AMD EPYC.
std::vector<torch::Tensor> lstm_backward(torch::Tensor grad_out, torch::Tensor grad_xg, torch::Tensor out,
                                         torch::Tensor cs, torch::Tensor acts, torch::Tensor w_hh,
                                         std::vector<int64_t> slots, std::vector<int64_t> axis,
                                         std::vector<int64_t> reverse) {
  grad_out = grad_out.contiguous();
  const int64_t Kg = cs.size(0), T = cs.size(1), N = cs.size(2), D = cs.size(3), G = 4 * D;
  TORCH_CHECK(out.is_contiguous() && out.sizes() == grad_out.sizes(), "out must be the forward's output, ",
              grad_out.sizes(), ", got ", out.sizes());
  Geometry geo = geometry(grad_xg, D, axis, reverse);
  const int64_t K = geo.K, OW = grad_out.size(3), tiles = (N + RT - 1) / RT;
  const int64_t items = (tiles + TILES_PER_ITEM - 1) / TILES_PER_ITEM;
  const int64_t Dp = pad_vl(D);
  auto w = pack_panels(w_hh);  // (Kg, 4D, Dp): grad h_{t-1} = dgates_t @ W_hh reads rows
  const bool in_l1 = G * Dp * 4 <= GRAD_W_IN_KERNEL_BYTES;
  // Per item partial sums (Kg, items, 4D, D) and (Kg, items, 4D).
  auto part_w = torch::empty({Kg, in_l1 ? items : 0, G, D}, cs.options());
  auto part_b = torch::empty({Kg, items, G}, cs.options());
  const float *go = grad_out.data_ptr<float>(), *op = out.data_ptr<float>(), *csp = cs.data_ptr<float>(),
              *ap = acts.data_ptr<float>(), *wp = w.data_ptr<float>();
  float *gx = grad_xg.data_ptr<float>(), *pwp = part_w.data_ptr<float>(), *pbp = part_b.data_ptr<float>();
  at::parallel_for(0, Kg * items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> dh(RT * Dp), dc(RT * D), dg(RT * G), hp(RT * Dp), zeros(D, 0.f), accb(G);
    std::vector<float> accw(in_l1 ? G * Dp : 0);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = item % Kg, it = item / Kg;
      std::fill(accw.begin(), accw.end(), 0.f);
      std::fill(accb.begin(), accb.end(), 0.f);
      for (int64_t tile = it * TILES_PER_ITEM; tile < std::min(tiles, (it + 1) * TILES_PER_ITEM); ++tile) {
        const int64_t n0 = tile * RT, rows = std::min(RT, N - n0);
        std::fill(dh.begin(), dh.end(), 0.f);
        std::fill(dc.begin(), dc.end(), 0.f);
        std::fill(dg.begin(), dg.end(), 0.f);  // rows past N stay zero: they add nothing to the sums
        std::fill(hp.begin(), hp.end(), 0.f);
        int64_t start[RT];
        for (int64_t r = 0; r < rows; ++r) start[r] = geo.start(k, n0 + r);
        for (int64_t t = T - 1; t >= 0; --t) {
          const int64_t shift = geo.step(k, t) * geo.stride(k);
          // where step t - 1 of each row sits in grad_out and out (h_{t-1}, for this step's grad W_hh)
          int64_t prev_row[RT];
          if (t > 0) {  // the next step's reads (t - 1), and h_{t-1}
            const int64_t prev = geo.step(k, t - 1) * geo.stride(k), base = (k * T + t - 1) * N + n0;
            const char* pa = (const char*)(ap + base * G);
            for (int64_t b = 0; b < rows * G * 4; b += 64) __builtin_prefetch(pa + b);
            if (t > 1) {
              const char* pc = (const char*)(csp + (base - N) * D);
              for (int64_t b = 0; b < rows * D * 4; b += 64) __builtin_prefetch(pc + b);
            }
            for (int64_t r = 0; r < rows; ++r) {
              prev_row[r] = (start[r] + prev) * OW + slots[k] * D;
              const char* pg = (const char*)(go + prev_row[r]);
              for (int64_t b = 0; b < D * 4; b += 64) __builtin_prefetch(pg + b);
              if (in_l1) {
                const char* ph = (const char*)(op + prev_row[r]);
                for (int64_t b = 0; b < D * 4; b += 64) __builtin_prefetch(ph + b);
              }
              const char* px = (const char*)(gx + ((start[r] + prev) * K + slots[k]) * G);
              for (int64_t b = 0; b < G * 4; b += 64) __builtin_prefetch(px + b, 1);
            }
          }
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t px = start[r] + shift, at_t = (k * T + t) * N + n0 + r;
            const float* a = ap + at_t * G;
            const float* ct = csp + at_t * D;
            // c_{-1} = 0 read from zeros: a load behind a branch would keep the loop below from vectorising.
            const float* cprev = t > 0 ? csp + (at_t - N) * D : zeros.data();
            const float* gor = go + px * OW + slots[k] * D;
            float *dgr = dg.data() + r * G, *dhr = dh.data() + r * Dp, *dcr = dc.data() + r * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) {
              const float i = a[d], f = a[D + d], g = a[2 * D + d], o = a[3 * D + d];
              const float tc = tanh_(ct[d]);
              const float cp = cprev[d];
              const float dhv = gor[d] + dhr[d];
              const float dcv = dcr[d] + dhv * o * (1.f - tc * tc);
              dgr[d] = dcv * g * i * (1.f - i);
              dgr[D + d] = dcv * cp * f * (1.f - f);
              dgr[2 * D + d] = dcv * i * (1.f - g * g);
              dgr[3 * D + d] = dhv * tc * o * (1.f - o);
              dcr[d] = dcv * f;
            }
            std::copy(dgr, dgr + G, gx + (px * K + slots[k]) * G);
#pragma omp simd
            for (int64_t j = 0; j < G; ++j) accb[j] += dgr[j];
          }
          if (t > 0 && in_l1) {  // h_{t-1} of the tile's rows (out, one step back), padded to whole vectors
            for (int64_t r = 0; r < rows; ++r) std::copy(op + prev_row[r], op + prev_row[r] + D, hp.data() + r * Dp);
            outer_acc(dg.data(), G, hp.data(), Dp, accw.data());
          }
          if (t > 0) tile_matmul(dg.data(), G, wp + k * G * Dp, Dp, dh.data());  // (RT, 4D) @ (4D, Dp)
        }
      }
      float* pw = pwp + (k * items + it) * G * D;
      for (int64_t g = 0; in_l1 && g < G; ++g) std::copy(accw.data() + g * Dp, accw.data() + g * Dp + D, pw + g * D);
      std::copy(accb.begin(), accb.end(), pbp + (k * items + it) * G);
    }
  });
  if (in_l1) return {part_w.sum(1), part_b.sum(1)};
  std::vector<torch::Tensor> grad_w;
  for (int64_t k = 0; k < Kg; ++k)
    grad_w.push_back(grad_w_hh_gemm(grad_xg, out, slots[k], axis[k] == 0, reverse[k] != 0));
  return {torch::stack(grad_w), part_b.sum(1)};
}

// x += bias and y = gelu(x) (exact, erf), x and y (M, N) contiguous, bias (N,) or none; y may be x. The
// epilogue of the MLP's first GEMM: at inference in place (one pass where addmm + gelu_ make two, the bias
// copied into the output before the GEMM, then GELU), in training into y, x keeping the pre-activation for the
// backward. With no bias, GELU alone: after an int8 GEMM, which adds its bias itself (1.3-1.5x aten's gelu_).
void bias_gelu(torch::Tensor x, c10::optional<torch::Tensor> bias, torch::Tensor y) {
  TORCH_CHECK(x.dim() == 2 && cpu_float(x) && cpu_float(y) && y.sizes() == x.sizes(), "x and y must be contiguous "
              "2-D float32 CPU tensors of one shape, got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK(!bias || (cpu_float(*bias) && bias->numel() == x.size(1)),
              "bias must have x.size(1) = ", x.size(1), " float32 elements, got ", bias->sizes());
  const int64_t N = x.size(1);
  float *xp = x.data_ptr<float>(), *yp = y.data_ptr<float>();
  const std::vector<float> zeros(bias ? 0 : N, 0.f);  // adding zeros keeps one loop that vectorises
  const float* bp = bias ? bias->data_ptr<float>() : zeros.data();
  at::parallel_for(0, x.size(0), std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float *xr = xp + r * N, *yr = yp + r * N;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) {
        const float v = xr[j] + bp[j];
        xr[j] = v;
        yr[j] = 0.5f * v * (1.f + erf_(v * 0.70710678118654752f));
      }
    }
  });
}

// Rows per partial sum of gelu_backward_bias: a fixed blocking, so the bias gradient is the same for any
// thread count.
constexpr int64_t GELU_ROWS = 256;

// dx = dy * gelu'(x) for the pre-activation x, all (M, N) contiguous; returns the bias gradient, the column
// sums of dx, from the same pass (autograd's addmm backward reads dx again for them).
torch::Tensor gelu_backward_bias(torch::Tensor dy, torch::Tensor x, torch::Tensor dx) {
  TORCH_CHECK(x.dim() == 2 && cpu_float(x) && cpu_float(dy) && cpu_float(dx) && dy.sizes() == x.sizes() &&
              dx.sizes() == x.sizes(), "dy, x and dx must be contiguous float32 CPU tensors of one 2-D shape, got ",
              dy.sizes(), ", ", x.sizes(), ", ", dx.sizes());
  const int64_t M = x.size(0), N = x.size(1), blocks = (M + GELU_ROWS - 1) / GELU_ROWS;
  auto part = torch::zeros({blocks, N}, x.options());
  const float *gp = dy.data_ptr<float>(), *xp = x.data_ptr<float>();
  float *dp = dx.data_ptr<float>(), *pp = part.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      float* acc = pp + blk * N;
      for (int64_t r = blk * GELU_ROWS; r < std::min(M, (blk + 1) * GELU_ROWS); ++r) {
        const float *xr = xp + r * N, *gr = gp + r * N;
        float* dr = dp + r * N;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) {
          const float v = xr[j];
          const float cdf = 0.5f * (1.f + erf_(v * 0.70710678118654752f));
          const float pdf = 0.39894228040143268f * exp_(-0.5f * v * v);
          const float d = gr[j] * (cdf + v * pdf);
          dr[j] = d;
          acc[j] += d;
        }
      }
    }
  });
  return part.sum(0);
}

// out = layer_norm(x) over rows of x (M, C), and, in the same pass, seed = x + add (add (C,) or none: seed
// = x), where seed may be x itself: the accumulator the block's next GEMM adds onto (the residual stream plus
// that GEMM's bias). Two elementwise passes and a fresh tensor fewer than F.layer_norm and torch.add.
// Mean and variance in two passes over the row (it sits in L1), as torch computes them: biased variance.
void layer_norm_seed(torch::Tensor x, c10::optional<torch::Tensor> weight, c10::optional<torch::Tensor> bias,
                     double eps, c10::optional<torch::Tensor> add, torch::Tensor out, torch::Tensor seed) {
  const int64_t C = x.size(-1);
  TORCH_CHECK(x.dim() == 2 && cpu_float(x) && cpu_float(out) && cpu_float(seed) && out.sizes() == x.sizes() &&
              seed.sizes() == x.sizes(),
              "x, out and seed must be contiguous float32 CPU tensors of one 2-D shape, got ", x.sizes(), ", ",
              out.sizes(), ", ", seed.sizes());
  TORCH_CHECK(out.data_ptr() != x.data_ptr(), "out must not be x (seed may be)");
  for (const auto* t : {&weight, &bias, &add})
    TORCH_CHECK(!t->has_value() || (cpu_float(**t) && (*t)->numel() == C), "weight, bias and add must be (", C,
                ") float32, got ", (*t)->sizes());
  const float *xp = x.data_ptr<float>(), *wp = weight ? weight->data_ptr<float>() : nullptr;
  const float *bp = bias ? bias->data_ptr<float>() : nullptr, *ap = add ? add->data_ptr<float>() : nullptr;
  float *op = out.data_ptr<float>(), *sp = seed.data_ptr<float>();
  const float e = (float)eps;
  at::parallel_for(0, x.size(0), std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * C;
      float *orow = op + r * C, *srow = sp + r * C;
      float sum = 0.f, sq = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < C; ++j) sum += xr[j];
      const float mean = sum / C;
#pragma omp simd reduction(+ : sq)
      for (int64_t j = 0; j < C; ++j) sq += (xr[j] - mean) * (xr[j] - mean);
      const float rstd = 1.f / std::sqrt(sq / C + e);
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) {
        const float v = xr[j];
        float y = (v - mean) * rstd;
        if (wp) y *= wp[j];
        if (bp) y += bp[j];
        orow[j] = y;
        srow[j] = ap ? v + ap[j] : v;  // read before written: seed may be x
      }
    }
  });
}

// The GEMMs of the native inference path where they beat the BLAS torch ships (seqvision/ops/gemm.py says
// where): out (M, N) (+)= x (M, K) @ W^T with the tile kernel's register blocking in a shape of its own, GR rows
// by GV vectors, and W packed once in panels of GV vectors (pack_gemm). Each thread takes whole blocks of rows,
// and each block, in L1, meets every panel in turn. Grouping the panels so that a group stays in L2 while all
// the thread's rows pass (384 KB groups, as first written) was 0-9% slower over 7 shapes on the Zen 4 below,
// in both builds. AVX2 6 x 2 ymm (12 accumulators, 2 weight loads and 6 broadcasts per 12 FMAs) reached 3-28%
// more GFLOP/s than the recurrence's 4 x 3 over 11 of the two models' shapes on an AMD EPYC (Zen 4, AVX2 build;
// separate runs), and 1.11-1.51x MKL's speed; AVX-512 6 x 4 zmm was level with 8 x 3 and 12 x 2. Bias + GELU
// in this loop, on each block of rows while it is in cache, ran the whole model 0.985-0.997x as fast as the
// separate bias_gelu pass, so there is no epilogue here.
constexpr int64_t GR = 6;
#if defined(__AVX512F__) || defined(SEQVISION_AVX512_TILES)
constexpr int GV = 4;
#else
constexpr int GV = 2;
#endif

// W (N, K) -> (K, N) in panels of GV vectors: what gemm_nt reads. N must be a multiple of PAD.
torch::Tensor pack_gemm(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat && w.device().is_cpu() && w.size(0) % PAD == 0,
              "W must be a 2-D float32 CPU tensor with a multiple of ", PAD, " rows, got ", w.sizes());
  return pack_panels(w.t().unsqueeze(0), GV * VL).squeeze(0);
}

// out (M, N) = x (M, K) @ W^T, or out += it with `accumulate`; x and out contiguous, w = pack_gemm(W).
void gemm_nt(torch::Tensor x, torch::Tensor w, torch::Tensor out, bool accumulate) {
  TORCH_CHECK(x.dim() == 2 && cpu_float(x) && cpu_float(w) && cpu_float(out) && w.dim() == 2 && out.dim() == 2 &&
              w.size(0) == x.size(1) && out.size(0) == x.size(0) && out.size(1) == w.size(1),
              "x (M, K), pack_gemm(W) (K, N) and out (M, N) must be contiguous float32 CPU tensors, got ", x.sizes(),
              ", ", w.sizes(), ", ", out.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1), blocks = (M + GR - 1) / GR;
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xt, ot;  // the last rows, padded to GR
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r0 = b * GR, rows = std::min(GR, M - r0);
      const float* xr = xp + r0 * K;
      float* orow = op + r0 * N;
      if (rows < GR) {
        xt.assign(GR * K, 0.f);
        ot.assign(GR * N, 0.f);
        std::copy(xr, xr + rows * K, xt.begin());
        if (accumulate) std::copy(orow, orow + rows * N, ot.begin());
        xr = xt.data();
        orow = ot.data();
      }
      if (accumulate) panels_matmul<GR, GV, true>(xr, K, wp, N, orow, N);
      else panels_matmul<GR, GV>(xr, K, wp, N, orow, N);
      if (rows < GR) std::copy(ot.begin(), ot.begin() + rows * N, op + r0 * N);
    }
  });
}

// The int8 GEMM of the native inference path where the engines' int8 GEMMs saturate (no VNNI or AMX):
// out (M, N) (+)= sx * (q (M, K) @ W^T) * sw + bias, q the activations' codes less their zero point as int16
// (qgemm_nt quantises them block by block) and W the int8 weights widened to int16, pairs of k interleaved
// (pack_qgemm). vpmaddwd multiplies 16-bit pairs and sums each pair into int32, so no sum saturates (the
// engines' u8 x s8 vpmaddubsw sums pairs into int16) and the sums are torch's to the last integer: two
// multiply-adds per 32-bit lane, where an fp32 FMA does one.
// QR rows by QV vectors of int32 accumulators; the epilogue scales, adds the bias and writes or adds onto out.
// vpmaddwd does not accumulate, so each product needs a register of its own beside the accumulators. On an AMD
// EPYC (Zen 4), 2 threads, 7 shapes of the two models, one process, alternating, the GEMM alone (codes made
// beforehand) against gemm_nt: AVX2 build
// 3 x 3 ymm 1.14-1.63x, 3 x 2 1.15-1.57x, 2 x 4 1.18-1.60x, 4 x 2 0.84-1.08x and 4 x 3 0.76-1.09x (spilled);
// AVX-512 build (without VNNI) 6 x 2 zmm 1.46-1.79x, 4 x 4 1.51-1.78x, 6 x 4 1.05-1.46x.
namespace {
#if defined(__AVX512BW__)
typedef __m512i ivec;
constexpr int IL = 16;
inline ivec imadd(ivec a, ivec b) { return _mm512_madd_epi16(a, b); }
inline ivec iadd(ivec a, ivec b) { return _mm512_add_epi32(a, b); }
inline ivec iload(const int16_t* p) { return _mm512_loadu_si512(p); }
inline ivec ibcast(int32_t v) { return _mm512_set1_epi32(v); }
inline void istore(int32_t* p, ivec v) { _mm512_storeu_si512(p, v); }
constexpr int QR = 6, QV = 2;
#elif defined(__AVX2__)
typedef __m256i ivec;
constexpr int IL = 8;
inline ivec imadd(ivec a, ivec b) { return _mm256_madd_epi16(a, b); }
inline ivec iadd(ivec a, ivec b) { return _mm256_add_epi32(a, b); }
inline ivec iload(const int16_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
inline ivec ibcast(int32_t v) { return _mm256_set1_epi32(v); }
inline void istore(int32_t* p, ivec v) { _mm256_storeu_si256((__m256i*)p, v); }
constexpr int QR = 3, QV = 3;
#else
typedef __m128i ivec;
constexpr int IL = 4;
inline ivec imadd(ivec a, ivec b) { return _mm_madd_epi16(a, b); }
inline ivec iadd(ivec a, ivec b) { return _mm_add_epi32(a, b); }
inline ivec iload(const int16_t* p) { return _mm_loadu_si128((const __m128i*)p); }
inline ivec ibcast(int32_t v) { return _mm_set1_epi32(v); }
inline void istore(int32_t* p, ivec v) { _mm_storeu_si128((__m128i*)p, v); }
constexpr int QR = 3, QV = 3;
#endif
constexpr int64_t QPW = QV * IL;  // columns per panel of pack_qgemm
// Blocks of rows that qgemm_nt quantises in one call: 4, 16 and 64 were level (AVX2 build, as above).
constexpr int64_t QCHUNK = 16;

// acc (R, V*IL) = q[0:R] @ the first V vectors of the panel w, q row-major (k int16 wide, k even), w a panel of
// pack_qgemm (k / 2 steps of QV vectors, each IL columns x 2 k interleaved).
template <int R, int V>
inline void qblock(const int16_t* q, int64_t k, const int16_t* w, int32_t* acc) {
  ivec a[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) a[r][v] = ibcast(0);
  for (int64_t p = 0; p < k; p += 2) {
    ivec wv[V];
    for (int v = 0; v < V; ++v) wv[v] = iload(w + p * QV * IL + 2 * IL * v);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, q + r * k + p, 4);
      const ivec b = ibcast(pair);
      for (int v = 0; v < V; ++v) a[r][v] = iadd(a[r][v], imadd(b, wv[v]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) istore(acc + r * V * IL + v * IL, a[r][v]);
}

// out[0:R, j:j+width] (+)= acc * scale[j:] + bias[j:] (bias may be null), acc (R, V*IL) from qblock.
template <int R, int V>
inline void qpanel(const int16_t* q, int64_t k, const int16_t* w, const float* __restrict scale,
                   const float* __restrict bias, float* out, int64_t ldo, int64_t j, int64_t width, bool accumulate) {
  alignas(64) int32_t acc[R * V * IL];
  qblock<R, V>(q, k, w, acc);
  for (int r = 0; r < R; ++r) {
    float* __restrict o = out + r * ldo + j;
    const int32_t* __restrict ar = acc + r * V * IL;
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) {
      const float y = static_cast<float>(ar[c]) * scale[j + c] + (bias ? bias[j + c] : 0.f);
      o[c] = accumulate ? o[c] + y : y;
    }
  }
}

// qpanel<R, vectors> for 1 <= vectors <= V: a panel whose last columns are padding.
template <int R, int V>
inline void qpanel_upto(int64_t vectors, const int16_t* q, int64_t k, const int16_t* w, const float* scale,
                        const float* bias, float* out, int64_t ldo, int64_t j, int64_t width, bool accumulate) {
  if (vectors == V || V == 1) qpanel<R, V>(q, k, w, scale, bias, out, ldo, j, width, accumulate);
  else if constexpr (V > 1) qpanel_upto<R, V - 1>(vectors, q, k, w, scale, bias, out, ldo, j, width, accumulate);
}

// The panels of one block of R rows. Each block meets every panel, as gemm_nt's rows do; panels outside the
// blocks of a chunk of rows (a panel in L1 while the chunk's 48 rows pass) ran 0.75-0.98x as fast on
// Sequencer2D-S's shapes (AVX2 build).
template <int R>
void qrows(const int16_t* q, int64_t k, const int16_t* w, int64_t n, const float* scale, const float* bias,
           float* out, int64_t ldo, bool accumulate) {
  for (int64_t j = 0; j < n; j += QPW) {
    const int64_t width = std::min<int64_t>(QPW, n - j);
    // panels are QPW columns wide, the last padded with zero weights
    qpanel_upto<R, QV>((width + IL - 1) / IL, q, k, w + j * k, scale, bias, out, ldo, j, width, accumulate);
  }
}

// qrows<rows> for 1 <= rows <= R: the last block of rows.
template <int R>
void qrows_upto(int64_t rows, const int16_t* q, int64_t k, const int16_t* w, int64_t n, const float* scale,
                const float* bias, float* out, int64_t ldo, bool accumulate) {
  if (rows == R || R == 1) qrows<R>(q, k, w, n, scale, bias, out, ldo, accumulate);
  else if constexpr (R > 1) qrows_upto<R - 1>(rows, q, k, w, n, scale, bias, out, ldo, accumulate);
}

}  // namespace

// W (N, K) int8 -> int16 (ceil(N / QPW) panels, each K / 2 steps of QV vectors of IL columns x 2 k): what
// qgemm_nt reads. K must be even; the last panel is padded with zero weights.
torch::Tensor pack_qgemm(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kChar && w.device().is_cpu() && w.size(1) % 2 == 0,
              "W must be a 2-D int8 CPU tensor with an even number of columns, got ", w.sizes(), " (",
              w.scalar_type(), ")");
  const int64_t N = w.size(0), K = w.size(1), panels = (N + QPW - 1) / QPW;
  auto padded = torch::zeros({panels * QPW, K}, w.options().dtype(torch::kShort));
  padded.narrow(0, 0, N).copy_(w);
  // (panels * QV * IL, K) -> (panels, QV, IL, K / 2, 2) -> (panels, K / 2, QV, IL, 2): per k pair, whole
  // vectors of IL columns with their two k side by side, as vpmaddwd pairs them
  return padded.view({panels, QV, IL, K / 2, 2}).permute({0, 3, 1, 2, 4}).contiguous().view({panels * QPW, K});
}

namespace {
constexpr int64_t QUANT_GRAIN = 1 << 14;

// q = clamp(round(x * inv) + offset, lo, hi) over len floats: uint8 codes (offset the zero point, 0..qmax), or
// int16 codes less the zero point (offset 0, -zp..qmax - zp). A function of its own, its values arguments:
// with them read from a lambda's captures GCC did not vectorise the int16 loop, and a narrow store that may
// alias them makes it reload them every element (12x slower).
template <typename T>
void quantize_span(const float* __restrict xr, T* __restrict qr, int64_t len, float inv, float offset, float lo,
                   float hi) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    // round half to even by the 1.5 * 2^23 addition (see exp_)
    float v = (xr[i] * inv + 12582912.f) - 12582912.f + offset;
    v = v < lo ? lo : v > hi ? hi : v;
    qr[i] = static_cast<T>(static_cast<int32_t>(v));
  }
}

// The dynamic quantisation of a tensor, as torch's chooses it.
struct QuantParams {
  double scale;  // NaN where the tensor holds a NaN
  int64_t zero_point, qmax;
  float inv() const { return 1.f / static_cast<float>(scale); }
};

// x's range (one parallel pass) -> torch's ChooseQuantizationParams (quint8, qmin 0, qmax 255, or 127 with
// reduce_range): the zero point from whichever end of the range loses less, rounded and clamped.
QuantParams quant_params(const float* xp, int64_t n, bool reduce_range) {
  const int64_t grain = QUANT_GRAIN, parts = std::max<int64_t>(1, (n + grain - 1) / grain);
  std::vector<float> lo(parts, 0.f), hi(parts, 0.f);  // starting at 0: the range always holds zero
  std::vector<char> nan(parts, 0);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float a = 0.f, b = 0.f, bad = 0.f;
      const float* xr = xp + p * grain;
      const int64_t len = std::min(n - p * grain, grain);
#pragma omp simd reduction(min : a) reduction(max : b) reduction(+ : bad)
      for (int64_t i = 0; i < len; ++i) {
        const float v = xr[i];
        a = v < a ? v : a;
        b = v > b ? v : b;
        bad += v != v ? 1.f : 0.f;
      }
      lo[p] = a, hi[p] = b, nan[p] = bad != 0.f;
    }
  });
  const int64_t qmax = reduce_range ? 127 : 255;
  if (std::find(nan.begin(), nan.end(), 1) != nan.end()) return {std::numeric_limits<double>::quiet_NaN(), 0, qmax};
  const float mn = *std::min_element(lo.begin(), lo.end()), mx = *std::max_element(hi.begin(), hi.end());
  double scale = (static_cast<double>(mx) - mn) / qmax;
  if (static_cast<float>(scale) == 0.f || std::isinf(1.f / static_cast<float>(scale))) scale = 0.1;
  const double from_min = -mn / scale, from_max = qmax - mx / scale;
  const double zp0 = -std::abs(mn / scale) < qmax - std::abs(mx / scale) ? from_min : from_max;
  return {scale, zp0 < 0 ? 0 : zp0 > qmax ? qmax : static_cast<int64_t>(std::nearbyint(zp0)), qmax};
}
}  // namespace

// out (M, N) = quantised(x) @ W^T * (x_scale * w_scale) + bias, or out += it with `accumulate`: x (M, K) float32
// quantised dynamically as quantize_u8 does (7-bit codes with reduce_range), each block of rows into a
// thread-local buffer as int16 less the zero point just before its GEMM, so the codes never pass through
// memory; w = pack_qgemm(W), w_scale (N,) per output channel, bias (N,) or None. A NaN in x gives NaN outputs.
void qgemm_nt(torch::Tensor x, bool reduce_range, torch::Tensor w, torch::Tensor w_scale,
              c10::optional<torch::Tensor> bias, torch::Tensor out, bool accumulate) {
  TORCH_CHECK(x.dim() == 2 && cpu_float(x) && w.scalar_type() == torch::kShort && w.is_contiguous() && w.dim() == 2 &&
              w.size(1) == x.size(1) && cpu_float(w_scale) && cpu_float(out) && out.dim() == 2 &&
              out.size(0) == x.size(0) && w.size(0) == (out.size(1) + QPW - 1) / QPW * QPW &&
              w_scale.numel() == out.size(1) && (!bias || (cpu_float(*bias) && bias->numel() == out.size(1))),
              "x (M, K) float32, pack_qgemm(W), w_scale (N,), bias (N,) and out (M, N) float32, all contiguous, got ",
              x.sizes(), ", ", w.sizes(), ", ", w_scale.sizes(), " and ", out.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1);
  const float* xp = x.data_ptr<float>();
  const QuantParams qp = quant_params(xp, M * K, reduce_range);
  // the scale of each column as torch's int8 linear takes it: the float product of the two scales (NaN
  // with a NaN input, which every output then takes)
  std::vector<float> scale(N);
  const float* ws = w_scale.data_ptr<float>();
  for (int64_t c = 0; c < N; ++c) scale[c] = static_cast<float>(qp.scale) * ws[c];
  const float inv = std::isnan(qp.scale) ? 0.f : qp.inv(), z = static_cast<float>(qp.zero_point);
  const int16_t* wp = w.data_ptr<int16_t>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  // chunks of QCHUNK blocks of rows, each quantised in one call into a buffer that stays in L1 or L2
  const int64_t chunk = QR * QCHUNK, chunks = (M + chunk - 1) / chunk;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int16_t> codes(chunk * K);
    for (int64_t c = begin; c < end; ++c) {
      const int64_t c0 = c * chunk, crows = std::min(chunk, M - c0);
      quantize_span(xp + c0 * K, codes.data(), crows * K, inv, 0.f, -z, static_cast<float>(qp.qmax) - z);
      for (int64_t r = 0; r < crows; r += QR)
        qrows_upto<QR>(std::min<int64_t>(QR, crows - r), codes.data() + r * K, K, wp, N, scale.data(), bp,
                       op + (c0 + r) * N, N, accumulate);
    }
  });
}

// Dynamic int8 activations for oneDNN's int8 GEMM at inference: x (M, K) float32 -> q (M, K) uint8 written
// into a reused buffer, and the (scale, zero point) of x's range, chosen as torch's dynamic quantisation
// chooses them (quant_params). Two passes: the range, then q = clamp(round(x / scale) + zero point). A NaN
// anywhere gives a NaN scale, so every output of the GEMM is NaN rather than a finite number made from a
// meaningless code.
std::tuple<double, int64_t> quantize_u8(torch::Tensor x, bool reduce_range, torch::Tensor q) {
  TORCH_CHECK(cpu_float(x) && q.is_contiguous() && q.scalar_type() == torch::kByte && q.sizes() == x.sizes(),
              "x must be a contiguous float32 CPU tensor and q a contiguous uint8 tensor of its shape, got ",
              x.sizes(), " (", x.scalar_type(), ") and ", q.sizes(), " (", q.scalar_type(), ")");
  const int64_t n = x.numel(), grain = QUANT_GRAIN;
  const float* xp = x.data_ptr<float>();
  const QuantParams qp = quant_params(xp, n, reduce_range);
  if (std::isnan(qp.scale)) {
    q.fill_(0);
    return {qp.scale, 0};
  }
  const float inv = qp.inv(), z = static_cast<float>(qp.zero_point), top = static_cast<float>(qp.qmax);
  uint8_t* qptr = q.data_ptr<uint8_t>();
  at::parallel_for(0, (n + grain - 1) / grain, 1, [=](int64_t begin, int64_t end) {
    quantize_span(xp + begin * grain, qptr + begin * grain, std::min(n, end * grain) - begin * grain, inv, z, 0.f, top);
  });
  return {qp.scale, qp.zero_point};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_recurrent", &pack_recurrent, "W_hh (K, 4D, D) in the layout lstm_forward reads");
  m.def("lstm_forward", &lstm_forward, "BiLSTM2D recurrences of one group of directions, forward");
  m.def("lstm_backward", &lstm_backward, "BiLSTM2D recurrences of one group of directions, backward");
  m.def("bias_gelu", &bias_gelu, "x += bias, y = gelu(x) (exact GELU; y may be x; bias may be None): the MLP's "
        "first epilogue");
  m.def("gelu_backward_bias", &gelu_backward_bias, "dx = dy * gelu'(x), and the column sums of dx");
  m.def("layer_norm_seed", &layer_norm_seed, "out = layer_norm(x), seed = x + add, in one pass over x");
  m.def("pack_gemm", &pack_gemm, "W (N, K) in the layout gemm_nt reads");
  m.def("quantize_u8", &quantize_u8, "x (M, K) -> uint8 q written into a buffer, and the (scale, zero point) "
        "torch's dynamic quantisation chooses");
  m.def("gemm_nt", &gemm_nt, "out (+)= x @ W^T, W packed by pack_gemm: the native inference GEMM");
  m.def("pack_qgemm", &pack_qgemm, "W (N, K) int8 in the layout qgemm_nt reads");
  m.def("qgemm_nt", &qgemm_nt, "out (+)= quantised(x) @ W^T * scales + bias, W packed by pack_qgemm: the native "
        "int8 GEMM");
}
