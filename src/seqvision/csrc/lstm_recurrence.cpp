// The sequential part of BiLSTM2D: K LSTM directions stepping together, each step one batched
// h @ W_hh^T and one fused pointwise cell, forward and backward.
//
// The input gates of every direction come precomputed by one GEMM as xg (B, H, W, K, 4D) and are read in
// place: direction k walks the columns (axis 0, sequences of length H, batch B*W) or the rows (axis 1,
// length W, batch B*H), forwards or reversed, and writes its hidden states straight into out
// (B, H, W, K*D) at channels [k*D, (k+1)*D). No permuted copies of the activations are made.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

namespace {

// Written with expf only, so that with -ffast-math the loops below vectorise through glibc's libmvec.
inline float sigm(float x) { return 1.f / (1.f + std::exp(-x)); }
inline float tanh_(float x) { return 2.f / (1.f + std::exp(-2.f * x)) - 1.f; }

struct Geometry {
  int64_t B, H, W, K, D;
  std::vector<int64_t> axis, reverse;  // per direction in this group
  int64_t T() const { return axis[0] == 0 ? H : W; }
  int64_t N() const { return axis[0] == 0 ? B * W : B * H; }
  // Flat (b, row, col) pixel index of batch element n of direction k at step t.
  int64_t pixel(int64_t k, int64_t t, int64_t n) const {
    int64_t s = reverse[k] ? T() - 1 - t : t;
    if (axis[k] == 0) {  // column sequences: n = b * W + col, the step is the row
      int64_t b = n / W, col = n % W;
      return (b * H + s) * W + col;
    }
    int64_t b = n / H, row = n % H;  // row sequences: n = b * H + row, the step is the column
    return (b * H + row) * W + s;
  }
};

Geometry geometry(const torch::Tensor& xg, int64_t D, const std::vector<int64_t>& axis,
                  const std::vector<int64_t>& reverse) {
  Geometry g{xg.size(0), xg.size(1), xg.size(2), xg.size(3), D, axis, reverse};
  for (size_t k = 1; k < axis.size(); ++k)
    TORCH_CHECK(g.H == g.W || axis[k] == axis[0], "directions of both axes step together only when H == W");
  return g;
}

}  // namespace

// xg: (B, H, W, K, 4D) input projections without bias; bias: (K, 4D), b_ih + b_hh, added in the cell
// (so the projection GEMM needs no bias copy); w_hh: (Kg, 4D, D) for the Kg directions of this group,
// whose xg/out/bias slots are `slots`; out: (B, H, W, K*D) written for those slots.
// With `save`, returns hs, cs (Kg, T, N, D) and activated gates (Kg, T, N, 4D) for backward.
std::vector<torch::Tensor> lstm_forward(torch::Tensor xg, torch::Tensor bias, torch::Tensor w_hh, torch::Tensor out,
                                        std::vector<int64_t> slots, std::vector<int64_t> axis,
                                        std::vector<int64_t> reverse, bool save) {
  TORCH_CHECK(xg.dim() == 5 && xg.is_contiguous() && out.is_contiguous(), "xg (B,H,W,K,4D) and out contiguous");
  TORCH_CHECK(xg.scalar_type() == torch::kFloat && w_hh.scalar_type() == torch::kFloat, "float32 only");
  const int64_t Kg = w_hh.size(0), D = w_hh.size(2), G = 4 * D;
  TORCH_CHECK(xg.size(4) == G && w_hh.size(1) == G && (int64_t)slots.size() == Kg, "shape mismatch");
  TORCH_CHECK(bias.is_contiguous() && bias.size(0) == xg.size(3) && bias.size(1) == G, "bias must be (K, 4D)");
  Geometry geo = geometry(xg, D, axis, reverse);
  const int64_t T = geo.T(), N = geo.N(), K = geo.K, OW = out.size(3);
  auto opts = xg.options();
  auto w_t = w_hh.transpose(1, 2).contiguous();  // (Kg, D, 4D)
  auto h = torch::zeros({Kg, N, D}, opts), c = torch::zeros({Kg, N, D}, opts);
  auto gates = torch::empty({Kg, N, G}, opts);
  torch::Tensor hs, cs, acts;
  if (save) {
    hs = torch::empty({Kg, T, N, D}, opts);
    cs = torch::empty({Kg, T, N, D}, opts);
    acts = torch::empty({Kg, T, N, G}, opts);
  }
  const float* x = xg.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float *o = out.data_ptr<float>(), *gp = gates.data_ptr<float>(), *hp = h.data_ptr<float>(), *cp = c.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    at::bmm_out(gates, h, w_t);  // (Kg, N, D) @ (Kg, D, 4D) -> (Kg, N, 4D)
    float* hsp = save ? hs.data_ptr<float>() : nullptr;
    float* csp = save ? cs.data_ptr<float>() : nullptr;
    float* ap = save ? acts.data_ptr<float>() : nullptr;
    at::parallel_for(0, Kg * N, 32, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t k = r / N, n = r % N, px = geo.pixel(k, t, n);
        const float* xr = x + (px * K + slots[k]) * G;
        const float* br = bp + slots[k] * G;
        float* g = gp + r * G;
        float* cr = cp + r * D;
        float* hr = hp + r * D;
        float* orow = o + px * OW + slots[k] * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          float i = sigm(g[d] + xr[d] + br[d]), f = sigm(g[D + d] + xr[D + d] + br[D + d]);
          float gg = tanh_(g[2 * D + d] + xr[2 * D + d] + br[2 * D + d]);
          float og = sigm(g[3 * D + d] + xr[3 * D + d] + br[3 * D + d]);
          g[d] = i; g[D + d] = f; g[2 * D + d] = gg; g[3 * D + d] = og;
          float cn = f * cr[d] + i * gg;
          cr[d] = cn;
          hr[d] = og * tanh_(cn);
          orow[d] = hr[d];
        }
        if (save) {
          const int64_t at_t = (k * T + t) * N + n;
          std::copy(hr, hr + D, hsp + at_t * D);
          std::copy(cr, cr + D, csp + at_t * D);
          std::copy(g, g + G, ap + at_t * G);
        }
      }
    });
  }
  return {hs, cs, acts};
}

// Backpropagation through time for one group. grad_out: (B, H, W, K*D); grad_xg: (B, H, W, K, 4D),
// written for this group's slots. Returns grad W_hh (Kg, 4D, D).
torch::Tensor lstm_backward(torch::Tensor grad_out, torch::Tensor grad_xg, torch::Tensor hs, torch::Tensor cs,
                            torch::Tensor acts, torch::Tensor w_hh, std::vector<int64_t> slots,
                            std::vector<int64_t> axis, std::vector<int64_t> reverse) {
  grad_out = grad_out.contiguous();
  const int64_t Kg = hs.size(0), T = hs.size(1), N = hs.size(2), D = hs.size(3), G = 4 * D;
  Geometry geo = geometry(grad_xg, D, axis, reverse);
  const int64_t K = geo.K, OW = grad_out.size(3);
  auto opts = hs.options();
  auto dh = torch::zeros({Kg, N, D}, opts), dc = torch::zeros({Kg, N, D}, opts);
  auto dg = torch::empty({Kg, N, G}, opts);
  auto grad_w = torch::zeros({Kg, G, D}, opts);
  auto w = w_hh.contiguous();  // (Kg, 4D, D)
  const float *go = grad_out.data_ptr<float>(), *hsp = hs.data_ptr<float>(), *csp = cs.data_ptr<float>(),
              *ap = acts.data_ptr<float>();
  float *gx = grad_xg.data_ptr<float>(), *dhp = dh.data_ptr<float>(), *dcp = dc.data_ptr<float>(),
        *dgp = dg.data_ptr<float>();
  for (int64_t t = T - 1; t >= 0; --t) {
    at::parallel_for(0, Kg * N, 32, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t k = r / N, n = r % N, px = geo.pixel(k, t, n), at_t = (k * T + t) * N + n;
        const float* a = ap + at_t * G;
        const float* ct = csp + at_t * D;
        const float* cprev = t > 0 ? csp + (at_t - N) * D : nullptr;
        const float* gor = go + px * OW + slots[k] * D;
        float* dgr = dgp + r * G;
        float* gxr = gx + (px * K + slots[k]) * G;
        float* dhr = dhp + r * D;
        float* dcr = dcp + r * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          float i = a[d], f = a[D + d], g = a[2 * D + d], o = a[3 * D + d];
          float tc = tanh_(ct[d]);
          float cp = cprev ? cprev[d] : 0.f;
          float dhv = gor[d] + dhr[d];
          float dcv = dcr[d] + dhv * o * (1.f - tc * tc);
          dgr[d] = dcv * g * i * (1.f - i);
          dgr[D + d] = dcv * cp * f * (1.f - f);
          dgr[2 * D + d] = dcv * i * (1.f - g * g);
          dgr[3 * D + d] = dhv * tc * o * (1.f - o);
          dcr[d] = dcv * f;
          gxr[d] = dgr[d]; gxr[D + d] = dgr[D + d]; gxr[2 * D + d] = dgr[2 * D + d]; gxr[3 * D + d] = dgr[3 * D + d];
        }
      }
    });
    if (t > 0) {
      // grad W_hh += dgates_t^T @ h_{t-1}; grad h_{t-1} = dgates_t @ W_hh
      grad_w.baddbmm_(dg.transpose(1, 2), hs.select(1, t - 1));
      at::bmm_out(dh, dg, w);
    }
  }
  return grad_w;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lstm_forward", &lstm_forward, "BiLSTM2D recurrences of one group of directions, forward");
  m.def("lstm_backward", &lstm_backward, "BiLSTM2D recurrences of one group of directions, backward");
}
