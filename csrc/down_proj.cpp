// moe_down_proj_profile_native on CPU.
//
// The routed rows are cut into one contiguous range per thread, and each range into pieces
// that belong to one expert. A thread walks its pieces; each piece is computed in blocks of
// [rows, channels] of y through torch's own GEMM (at::mm_out: MKL or oneDNN), and the
// statistics are reduced from each block right after its GEMM, while it is in cache, on the
// values as written to y (rounded to y's dtype). The pieces' statistics are merged in row
// order at the end, so ties go to the first (row, channel) in row-major order.
//
// The dtype the GEMMs run in is chosen at run time (cpu_isa.h `gemm_dtype`):
// - the input dtype (float32; bf16/fp16 where the CPU has bf16/fp16 GEMM instructions): the
//   GEMM writes the y block itself (addmm with the bias), then the block's stats are read;
// - float32 for bf16/fp16 elsewhere: the piece's rows and one block of weight columns are
//   upcast to fp32 buffers (fp32 GEMMs run about 4x faster than bf16 ones on CPUs without
//   bf16 instructions), the GEMM writes an fp32 block, and one pass adds the bias, rounds it
//   into y and reduces the stats of the rounded values.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "cpu_isa.h"
#include "down_proj.h"

namespace superexperts {
namespace {

// Bytes of one block of y (or of its fp32 accumulator): it stays in L2 between the GEMM that
// writes it and the pass that reads its statistics.
constexpr int64_t kBlockBytes = 256 * 1024;
// Rows per block at most, and output channels per block at least (narrower GEMMs waste the
// GEMM's packing of x); blocks are cut at multiples of kColAlign channels.
constexpr int64_t kMaxRowBlock = 128;
constexpr int64_t kMinColBlock = 256;
constexpr int64_t kColAlign = 64;
// Output channels per upcast weight block: the [kUpcastCols, I] fp32 copy is made once per
// piece and reused by every row block of it.
constexpr int64_t kUpcastCols = 256;

// Rows [begin, end) of one expert, handled by one thread.
struct Piece {
  int64_t expert, begin, end;
};

// Statistics of one piece: max |y| and its first (row, channel) in row-major order, max |x|.
struct PieceStats {
  float absmax = 0.f;
  int64_t row = -1, channel = -1;
  float in_absmax = 0.f;
};

struct Problem {
  at::Tensor x;     // [S, I] contiguous
  at::Tensor w;     // [E, H, I], or [E, I, H] when transposed
  at::Tensor bias;  // [E, H]: fp32 on the upcast path, x.dtype on the direct path; or undefined
  at::Tensor y;     // [S, H] x.dtype, contiguous
  int64_t hidden;
  bool transposed;
  bool with_stats;
  bool upcast;  // GEMMs in fp32 on upcast copies of bf16/fp16 inputs
};

// Cuts the routed rows [0, ends.back()) into `parts` ranges of equal length and each range at
// the expert boundaries. Returns the pieces in row order and, in `first`, where each range's
// pieces start (parts + 1 entries).
std::vector<Piece> split(const std::vector<int64_t>& ends, int64_t parts, std::vector<int64_t>& first) {
  const int64_t routed = ends.back();
  const int64_t length = (routed + parts - 1) / parts;
  std::vector<Piece> pieces;
  first.assign(1, 0);
  for (int64_t p = 0; p < parts; ++p) {
    const int64_t lo = std::min(routed, p * length), hi = std::min(routed, lo + length);
    int64_t e = std::upper_bound(ends.begin(), ends.end(), lo) - ends.begin();
    for (int64_t row = lo; row < hi; ++e) {
      const int64_t end = std::min(hi, ends[e]);
      if (end > row) pieces.push_back({e, row, end});
      row = std::max(row, end);
    }
    first.push_back(static_cast<int64_t>(pieces.size()));
  }
  return pieces;
}

// NaN above every number, as torch.max orders them.
inline bool above(float a, float b) { return a > b || (std::isnan(a) && !std::isnan(b)); }
inline bool same(float a, float b) { return a == b || (std::isnan(a) && std::isnan(b)); }

// Folds the max |y| of one row of a block (channels [c0, c0 + n)) into the piece's stats.
// Blocks are visited channel block by channel block, so an equal value found later wins only
// when it comes first in row-major order.
template <typename scalar_t>
void fold_row(PieceStats& st, float row_max, const scalar_t* out, int64_t row, int64_t c0) {
  if (st.row >= 0 && !above(row_max, st.absmax) && !(same(row_max, st.absmax) && row <= st.row)) return;
  int64_t c = 0;
  while (!same(std::abs(static_cast<float>(out[c])), row_max)) ++c;
  if (st.row < 0 || above(row_max, st.absmax) || row < st.row || (row == st.row && c0 + c < st.channel)) {
    st.absmax = row_max;
    st.row = row;
    st.channel = c0 + c;
  }
}

// Rows and columns of the blocks of one piece of `n` rows; `bytes` per element of a block.
std::tuple<int64_t, int64_t> block_shape(const Problem& pb, int64_t n, int64_t bytes) {
  const int64_t rows = std::min(n, kMaxRowBlock);
  if (pb.upcast) return {rows, std::min(pb.hidden, kUpcastCols)};
  const int64_t cols = std::max(kMinColBlock, kBlockBytes / (rows * bytes) / kColAlign * kColAlign);
  return {rows, std::min(pb.hidden, cols)};
}

// Per-thread buffers of the upcast path.
struct Workspace {
  at::Tensor w;    // [kUpcastCols * I] fp32: one upcast block of weight columns
  at::Tensor acc;  // [kMaxRowBlock * kUpcastCols] fp32: one block of y before rounding
};

// y rows of `piece` and their statistics; `chan` is the piece's [H] per-channel maxima, or null.
template <typename scalar_t>
void project_piece(const Problem& pb, const Piece& piece, Workspace& ws, PieceStats& st, float* chan) {
  const auto& k = cpu::kernels().of<scalar_t>();
  const int64_t n = piece.end - piece.begin, hidden = pb.hidden, inter = pb.x.size(1);
  const at::Tensor x = pb.x.narrow(0, piece.begin, n);  // [n, I]
  if (pb.with_stats) st.in_absmax = k.absmax_row(x.const_data_ptr<scalar_t>(), nullptr, n * inter);
  // a: the left-hand side of the GEMMs, [n, I] in the GEMM dtype.
  const at::Tensor a = pb.upcast ? x.to(at::kFloat) : x;
  const at::Tensor w = pb.w[piece.expert];
  const at::Tensor bias = pb.bias.defined() ? pb.bias[piece.expert] : at::Tensor();
  scalar_t* y = pb.y.data_ptr<scalar_t>();
  const auto [row_block, col_block] = block_shape(pb, n, pb.upcast ? 4 : pb.y.element_size());

  for (int64_t c0 = 0; c0 < hidden; c0 += col_block) {
    const int64_t nc = std::min(col_block, hidden - c0);
    // b: the [I, nc] right-hand side of this channel block.
    at::Tensor b = pb.transposed ? w.narrow(1, c0, nc) : w.narrow(0, c0, nc).t();
    if (pb.upcast) {
      const at::Tensor dst = ws.w.narrow(0, 0, nc * inter);
      b = pb.transposed ? dst.view({inter, nc}).copy_(b) : dst.view({nc, inter}).copy_(b.t()).t();
    }
    const float* bias_f = pb.upcast && bias.defined() ? bias.const_data_ptr<float>() + c0 : nullptr;
    for (int64_t r0 = 0; r0 < n; r0 += row_block) {
      const int64_t nr = std::min(row_block, n - r0);
      const int64_t row0 = piece.begin + r0;
      const at::Tensor a_rows = a.narrow(0, r0, nr);
      if (!pb.upcast) {
        at::Tensor out = pb.y.narrow(0, row0, nr).narrow(1, c0, nc);
        if (bias.defined()) {
          at::addmm_out(out, bias.narrow(0, c0, nc), a_rows, b);
        } else {
          at::mm_out(out, a_rows, b);
        }
        if (!pb.with_stats) continue;
        for (int64_t r = 0; r < nr; ++r) {
          const scalar_t* row = y + (row0 + r) * hidden + c0;
          fold_row(st, k.absmax_row(row, chan ? chan + c0 : nullptr, nc), row, row0 + r, c0);
        }
        continue;
      }
      at::Tensor acc = ws.acc.narrow(0, 0, nr * nc).view({nr, nc});
      at::mm_out(acc, a_rows, b);
      const float* acc_p = acc.const_data_ptr<float>();
      for (int64_t r = 0; r < nr; ++r) {
        scalar_t* row = y + (row0 + r) * hidden + c0;
        if (!pb.with_stats) {
          k.round_row_nostats(acc_p + r * nc, bias_f, row, nc);
          continue;
        }
        fold_row(st, k.round_row(acc_p + r * nc, bias_f, row, chan ? chan + c0 : nullptr, nc), row, row0 + r, c0);
      }
    }
  }
}

DownProjOutputs moe_down_proj_profile_cpu(const at::Tensor& x_in, const at::Tensor& w_down, const at::Tensor& offsets,
                                          const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& row_token, bool w_transposed,
                                          bool channel_stats, bool with_stats) {
  const int64_t hidden = check_down_proj_args(x_in, w_down, offsets, bias, row_token, w_transposed);
  const std::vector<int64_t> ends = row_ends(offsets, x_in.size(0));
  auto outputs = empty_outputs(x_in, hidden, ends, channel_stats);
  auto& [y, out_absmax, out_argmax, in_absmax, rows, channel_absmax] = outputs;
  const int64_t routed = ends.back();
  y.narrow(0, routed, x_in.size(0) - routed).zero_();
  if (routed == 0) return outputs;

  const at::Tensor x = x_in.contiguous();
  const bool upcast = cpu::gemm_dtype(x.scalar_type()) != x.scalar_type();
  at::Tensor bias_t;
  if (bias) bias_t = upcast ? bias->to(at::kFloat).contiguous() : bias->contiguous();
  const Problem pb{x, w_down, bias_t, y, hidden, w_transposed, with_stats, upcast};
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), routed);
  std::vector<int64_t> first;
  const std::vector<Piece> pieces = split(ends, parts, first);
  std::vector<PieceStats> stats(pieces.size());
  const bool channels = with_stats && channel_stats;
  at::Tensor piece_chan = at::zeros({channels ? static_cast<int64_t>(pieces.size()) : 0, hidden}, at::kFloat);

  // Workers start with default thread-local state; give them the caller's (below autograd).
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    Workspace ws;
    if (upcast) {
      ws.w = at::empty({std::min(hidden, kUpcastCols) * x.size(1)}, at::kFloat);
      ws.acc = at::empty({kMaxRowBlock * kUpcastCols}, at::kFloat);
    }
    for (int64_t i = first[p0]; i < first[p1]; ++i) {
      float* chan = channels ? piece_chan[i].data_ptr<float>() : nullptr;
      SUPEREXPERTS_DISPATCH_FLOAT(x.scalar_type(), "moe_down_proj_profile_native", [&] {
        project_piece<scalar_t>(pb, pieces[i], ws, stats[i], chan);
      });
    }
  });
  if (!with_stats) return outputs;

  // Pieces of one expert come in row order: a later piece wins only with a larger value.
  const at::Tensor tokens = row_token ? row_token->to(at::kLong).contiguous() : at::Tensor();
  float* absmax = out_absmax.data_ptr<float>();
  int64_t* argmax = out_argmax.data_ptr<int64_t>();
  float* in_max = in_absmax.data_ptr<float>();
  std::vector<bool> seen(ends.size(), false);
  for (size_t i = 0; i < pieces.size(); ++i) {
    const int64_t e = pieces[i].expert;
    const PieceStats& s = stats[i];
    if (s.row >= 0 && (!seen[e] || above(s.absmax, absmax[e]))) {
      seen[e] = true;
      absmax[e] = s.absmax;
      argmax[2 * e] = tokens.defined() ? tokens.const_data_ptr<int64_t>()[s.row] : s.row;
      argmax[2 * e + 1] = s.channel;
    }
    in_max[e] = above(s.in_absmax, in_max[e]) ? s.in_absmax : in_max[e];
    if (channels) {
      float* dst = channel_absmax[e].data_ptr<float>();
      const float* src = piece_chan[i].const_data_ptr<float>();
      for (int64_t c = 0; c < hidden; ++c) dst[c] = above(src[c], dst[c]) ? std::abs(src[c]) : dst[c];
    }
  }
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(superexperts, CPU, m) {
  m.impl("moe_down_proj_profile_native", &moe_down_proj_profile_cpu);
}

}  // namespace superexperts
