// The kernel interface: plain functions on float arrays, one implementation per ISA, chosen at run
// time. Nothing here knows about models. All matrices are row-major.
#pragma once
#include <cstdint>

namespace pyxf::kernels {

enum class Activation : int { kSilu = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3 };

// How float weights are stored; 16-bit ones are widened in registers (half the bytes to read).
enum class WeightType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };
// Bytes of one element of type wt.
constexpr long type_bytes(WeightType wt) { return wt == WeightType::kF32 ? 4 : 2; }

// Quantized weight formats. The block formats are those of GGUF (fp16 scales), so llama.cpp's
// tensors are used as they are stored. Blocks of 32 weights:
//   q8_0: {fp16 d; int8 q[32]}            w = d q
//   q4_0: {fp16 d; uint8 qs[16]}          w = d (nibble - 8); byte j holds weights j (low), j+16 (high)
//   q4_1: {fp16 d; fp16 m; uint8 qs[16]}  w = d nibble + m
//   q5_0: {fp16 d; uint32 qh; uint8 qs[16]}          w = d (q - 16), q = nibble | bit j of qh << 4
//   q5_1: {fp16 d; fp16 m; uint32 qh; uint8 qs[16]}  w = d q + m
// K-quants, super-blocks of 256 weights (layouts in quant_k.cc and docs/DESIGN.md):
//   q4_k: {fp16 d, dmin; uint8 scales[12]; uint8 qs[128]}  8 sub-blocks of 32 with 6-bit scale and min:
//         w = d sc q - dmin m
//   q5_k: {fp16 d, dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]}  as q4_k with 5-bit q
//   q6_k: {uint8 ql[128]; uint8 qh[64]; int8 scales[16]; fp16 d}  16 sub-blocks of 16: w = d sc (q - 32)
// and int8: int8 row [K] and one float scale per row (symmetric, per output channel).
enum class QuantFormat : int {
  kQ8_0 = 0, kQ4_0 = 1, kQ4_1 = 2, kInt8 = 3, kQ5_0 = 4, kQ5_1 = 5, kQ4_K = 6, kQ5_K = 7, kQ6_K = 8,
};
constexpr int kQuantBlock = 32;
constexpr int kQuantSuperBlock = 256;
constexpr bool is_k_quant(QuantFormat f) {
  return f == QuantFormat::kQ4_K || f == QuantFormat::kQ5_K || f == QuantFormat::kQ6_K;
}
// The formats whose kernels live in quant_k.cc (quant.cc routes them there).
constexpr bool is_quant_k_format(QuantFormat f) {
  return is_k_quant(f) || f == QuantFormat::kQ5_0 || f == QuantFormat::kQ5_1;
}
// Weights per block: rows of a format hold a whole number of them.
constexpr int quant_block_cols(QuantFormat f) { return is_k_quant(f) ? kQuantSuperBlock : kQuantBlock; }
int quant_row_bytes(QuantFormat f, long cols);  // bytes of one stored row of `cols` weights

// Rows from which linear runs the packed GEMM: below, the dot-product kernel (packing w per call
// costs more than it saves).
constexpr long kFloatGemmRows = 160;
// Rows from which linear_quant runs a GEMM (below: one pass over the weights per call, GEMV-like).
constexpr long kQuantGemmRows = 16;

// Which layout a quantized matrix's gemm_panels hold: each table's many-rows kernel reads the
// panels only in its own layout (and packs per call otherwise), so panels made under one table stay
// correct after set_isa. kVnni: the AVX-512 tables' int8 GEMM; kBf16Tiles: avx512_amx's int8 format,
// dequantized to bf16 pair panels for its tiles.
enum class PanelLayout : int { kNone = 0, kVnni = 1, kBf16Tiles = 2, kStrips = 3 };

// PanelLayout::kStrips (the AVX-512 decode GEMV's, quant_strips.h): int8, q8_0, q4_0, q4_1, q5_0,
// q5_1, q4_k, q5_k and q6_k rows in strips of kStripRows, each strip strip_block_bytes(format) per
// block of the format (quant_block_cols): strip_vectors(format) 64-byte vectors, then the block's
// scales (as many bytes as its rows stored as they were; q4_k 2.8% and q5_k 2.3% more, their 6-bit
// scales and minima unpacked to bytes; int8's row scales stay in QuantWeight::row_scales).
constexpr int kStripRows = 16;
constexpr int strip_vectors(QuantFormat f) {
  return f == QuantFormat::kQ8_0 || f == QuantFormat::kInt8   ? 8
         : f == QuantFormat::kQ5_0 || f == QuantFormat::kQ5_1 ? 5
         : f == QuantFormat::kQ4_K                            ? 32
         : f == QuantFormat::kQ5_K                            ? 40
         : f == QuantFormat::kQ6_K                            ? 48
                                                              : 4;
}
constexpr long strip_block_bytes(QuantFormat f) {
  return strip_vectors(f) * 64L +
         (f == QuantFormat::kQ4_K || f == QuantFormat::kQ5_K   ? (2 * 8 + 2 * 2) * kStripRows
          : f == QuantFormat::kQ6_K                            ? (16 + 2) * kStripRows
          : f == QuantFormat::kQ4_1 || f == QuantFormat::kQ5_1 ? 2 * 2 * kStripRows
          : f == QuantFormat::kInt8                            ? 0
                                                               : 2 * kStripRows);
}
// Bytes of one strip of a matrix of `cols` columns.
constexpr long strip_row_bytes(QuantFormat f, long cols) { return cols / quant_block_cols(f) * strip_block_bytes(f); }

struct QuantWeight {
  QuantFormat format;
  const uint8_t* data;        // rows of quant_row_bytes(format, cols) bytes
  const float* row_scales;    // int8 only
  long rows;                  // N
  long cols;                  // K, a multiple of quant_block_cols(format)
  // The matrix repacked once, or null: for the many-rows kernel (KernelTable::pack_gemm_panels;
  // without, it repacks slices of the rows on every call), or for decode (pack_decode_panels). Read
  // by the tables whose layout panel_layout names; a view of some of the rows (a row block) keeps
  // them only where they start at a strip (kStrips).
  const uint8_t* gemm_panels = nullptr;
  PanelLayout panel_layout = PanelLayout::kNone;
};

// Keys per page of a paged KV cache: attention reads keys in blocks of this size, so one block of
// keys never straddles two pages.
constexpr int kKVPageTokens = 64;
// One position's key and value (head_dim floats each) for one kv head's page of a KV cache, whose
// elements are `type` (kF32, or kF16: IEEE half, rounded to nearest even): the key goes in
// transposed (element d at d * kKVPageTokens + slot), the value as a row (at slot * head_dim).
struct KVSlotWrite {
  void* key_page;
  void* value_page;
  int slot;
  const float* key;
  const float* value;
  WeightType type = WeightType::kF32;
};

// Writes from which KernelTable::store_kv_slots splits its writes across threads: each transposed
// key touches head_dim cache lines, mostly cold in a decode step (a batch of 64 translations
// writes 512 a layer); a few (a single sequence's step) are not worth waking the other threads.
constexpr long kParallelSlotWrites = 64;

// One sequence's share of an attention call. Queries are the sequence's new tokens. Key j of kv
// head g is at k + g * kv_head_stride + j * kv_pos_stride (values alike): a KV cache
// [kv_head][position][head_dim], or the qkv rows themselves when nothing is cached (encoders).
// With `pages` (a paged cache), key j of kv head g is at
//   k + pages[j / kKVPageTokens] * page_stride + g * kv_head_stride + (j % kKVPageTokens) * kv_pos_stride.
// With `keys_transposed` (a paged cache only), each page holds kv head g's keys transposed, as
// [head_dim][kKVPageTokens] at k + pages[b] * page_stride + g * kv_head_stride: key j's element d is
// at offset d * kKVPageTokens + j % kKVPageTokens; values keep the row layout above.
// Query i sits at position n_past + i and, when causal, sees keys 0 .. n_past + i.
struct AttentionSeq {
  const float* q;       // [n_new][q_row_stride], head h at column h * head_dim
  float* out;           // [n_new][out_row_stride]
  const void* k;        // elements of kv_type; strides below count elements
  const void* v;
  long kv_head_stride;
  long kv_pos_stride;
  int n_new;
  int n_past;
  int n_keys;           // keys visible to a non-causal query
  const int32_t* pages = nullptr;  // page of each kKVPageTokens keys, or null: keys are contiguous
  long page_stride = 0;            // elements from one page to the next
  bool keys_transposed = false;    // pages hold keys as [head_dim][kKVPageTokens] (see above)
  // kF32, or kF16 (a paged cache with keys transposed only): the tiles widen each vector of half
  // keys and values to float as they load it.
  WeightType kv_type = WeightType::kF32;
};

// Precision of attention's two products (scores and softmax-weighted values) in work items of many
// query rows (prefill, encoding): bf16 rounds the queries, keys, probabilities and values to bf16
// for them (fp32 sums), half the instructions of float FMAs on vdpbf16ps, a fraction on AMX tiles.
// Scores and the softmax stay float, and so do items of few rows (decode) and other tables.
enum class AttentionProducts : int {
  kFloat = 0,
  kBf16 = 1,         // where the table has vdpbf16ps (avx512_bf16, unless bf16_gemm_widens; avx512_amx):
                     // models computing in bf16
  kBf16OnTiles = 2,  // where it has AMX tiles (avx512_amx) only: quantized models, whose weights'
                     // rounding dwarfs bf16's (vdpbf16ps runs at half FMA's rate on some Intel CPUs)
};

struct AttentionShape {
  int n_heads;
  int n_kv_heads;       // n_heads % n_kv_heads == 0; query head h reads kv head h / (n_heads / n_kv_heads)
  int head_dim;
  long q_row_stride;
  long out_row_stride;
  float scale;
  bool causal;
  // Optional additive bias by relative position (T5): the score of query position i against key
  // position j of head h gains pos_bias[h * (2 R + 1) + clamp(j - i, -R, R) + R], R =
  // pos_bias_radius. Null: no bias.
  const float* pos_bias = nullptr;
  int pos_bias_radius = 0;
  // Sliding window: when > 0, key j is visible to the query at position i only if |i - j| < window
  // (on top of causality). 0: every key.
  int window = 0;
  // Soft-capping (Gemma 2): when > 0, each scaled score s becomes softcap * tanh(s / softcap) before
  // the position bias and the softmax. 0: none.
  float softcap = 0.0f;
  AttentionProducts products = AttentionProducts::kFloat;
};

struct KernelTable {
  const char* name;
  // y[M,N] (+)= x[M,K] w[N,K]^T + bias[N]; bias may be null; accumulate adds into y. `panels`:
  // w repacked by pack_dense_panels, or null; when given, every row count (decode included) runs on
  // them and no row of w is read.
  void (*linear)(const float* x, long M, long K, const void* w, WeightType wt, long N,
                 const float* bias, float* y, bool accumulate, const void* panels);
  // y[M, I] = act(x gate^T) * (x up^T) for w = [gate; up] (2 I rows, no bias); from
  // kFloatGemmRows rows, or on panels, the activation is applied to the GEMM's tiles (no 2 I-wide
  // intermediate).
  void (*linear_gated)(const float* x, long M, long K, const void* w, WeightType wt, long I, Activation act,
                       float* y, const void* panels);
  // Bytes of a [N, K] matrix of type wt repacked once into the GEMM's panels (0: this table packs
  // that type per call only), and the repacking into `out` (that many bytes, 64-byte aligned).
  // Packing per call costs a pass over the weights on every prefill call; on panels, decode reads
  // them as one stream per chunk of columns. Only the table that made them reads them.
  long (*dense_panel_bytes)(WeightType wt, long K, long N);
  void (*pack_dense_panels)(const void* w, WeightType wt, long K, long N, void* out);
  // Row `row` of a [rows, n] weight matrix, widened to float (embedding lookup).
  void (*load_row)(const void* w, WeightType wt, long row, long n, float* out);
  void (*rmsnorm)(const float* x, const float* w, float eps, long rows, long n, float* y);
  void (*layernorm)(const float* x, const float* w, const float* b, float eps, long rows, long n,
                    float* y);
  void (*add)(float* y, const float* x, long n);  // y += x
  void (*activation)(float* x, long n, Activation act);
  // x <- cap * tanh(x / cap): soft-capping of logits to (-cap, cap), cap > 0.
  void (*softcap)(float* x, long n, float cap);
  // out[r][j] = act(gu[r][j]) * gu[r][n + j] for rows of width 2n (gate half, then up half).
  void (*gated_activation)(const float* gu, long rows, long n, Activation act, float* out);
  void (*softmax)(float* x, long rows, long n);
  // x <- log_softmax(x) of one row, on the calling thread (callers parallelize over rows).
  void (*log_softmax)(float* x, long n);
  float (*logsumexp)(const float* x, long n);  // log(sum(exp(x))), one row, calling thread
  long (*argmax)(const float* x, long n);      // the first position of the largest, one row, calling thread
  // The k largest of x[t] + offset (float sums), best first, ties to the lower t: their sums and
  // positions; returns how many (min(k, n)). One row, calling thread.
  int (*top_k)(const float* x, long n, float offset, int k, float* scores, int32_t* indices);
  // cs[r] = cos(pos[r] f) * scaling for the `half` frequencies f, then the sines: the rotation
  // of one position, shared by every head and layer.
  void (*rope_table)(const int32_t* pos, long rows, const float* inv_freq, int half, float scaling, float* cs);
  // Rotates the first rot_dim dimensions of `n_heads` heads of each row in place by the angles of
  // cs[r] (rope_table rows, rot_dim / 2 frequencies).
  void (*rope)(float* x, long rows, long row_stride, int n_heads, int head_dim, int rot_dim, const float* cs,
               bool interleaved);
  void (*attention)(const AttentionSeq* seqs, int n_seqs, const AttentionShape& shape);
  // The writes (no two to the same slot), in parallel from kParallelSlotWrites of them.
  void (*store_kv_slots)(const KVSlotWrite* writes, long n, int head_dim);
  // Asks, without waiting, for the cache lines that store_kv_slots(writes) will write (their key
  // and value sources are not read): called before the work that precedes the stores, so that a
  // decode step's transposed keys (head_dim lines each, evicted by the weights streamed since the
  // last step) arrive while that work runs. Calling thread.
  void (*prefetch_kv_slots)(const KVSlotWrite* writes, long n, int head_dim);
  // y[M,N] (+)= x[M,K] dequant(w)^T + bias: x is quantized to 8 bits per block of 32 on the fly
  // and the dot products run on integers.
  void (*linear_quant)(const float* x, long M, const QuantWeight& w, const float* bias, float* y,
                       bool accumulate);
  // One matrix stored as n row ranges in different formats (llama.cpp's mixes fuse q, k and v of
  // two formats): y[M, sum of w[i].rows] (+)= x times each segment^T + bias, segment i's columns
  // after segment i-1's, in one parallel pass where the formats allow.
  void (*linear_quant_segments)(const float* x, long M, const QuantWeight* w, int n, const float* bias, float* y,
                                bool accumulate);
  void (*dequantize_row)(const QuantWeight& w, long row, float* out);
  // y[M, I] = act(x gate^T) * (x up^T) for w = [gate; up] (2 I rows), M >= kQuantGemmRows: the
  // activation runs on each GEMM tile in registers/L1, so the 2 I-wide product never reaches
  // memory. Null where the ISA has no fused kernel (callers use linear_quant + gated_activation).
  void (*linear_quant_gated)(const float* x, long M, const QuantWeight& w, Activation act, float* y);
  // Bytes of w repacked for the many-rows kernel (0: that kernel reads w's rows as stored), and
  // the repacking into `out` (that many bytes, 64-byte aligned), which w.gemm_panels may then name:
  // weights that serve many rows per call (encoders, translation) pay the repacking once at load
  // instead of on every call, for about 1.4x the int8 bytes (avx512_amx's int8: 2x, bf16). Null
  // where the ISA has no such layout. The packing returns the layout it wrote (QuantWeight::panel_layout).
  long (*gemm_panel_bytes)(const QuantWeight& w);
  PanelLayout (*pack_gemm_panels)(const QuantWeight& w, uint8_t* out);
  // The same for decoders, whose calls are mostly a few rows (decode) and sometimes many (prefill):
  // w repacked for the few-rows kernel (kStrips on AVX-512: about as many bytes as w), from which the
  // many-rows kernel packs its panels per call. 0 / null where w keeps its rows.
  long (*decode_panel_bytes)(const QuantWeight& w);
  PanelLayout (*pack_decode_panels)(const QuantWeight& w, uint8_t* out);
};

// The table in use: the best the CPU supports, or what PYXF_ISA / set_isa asked for.
const KernelTable& active();
// Names of the ISAs this CPU can run, best last.
int available_isas(const char** names, int max_names);
// Switches the active table; false when the CPU cannot run `name` or it is unknown.
bool set_isa(const char* name);

// Kernel variants chosen by CPU model rather than instruction set; every variant is correct
// everywhere, they differ in speed. The decode GEMV on quantized weights (AVX-512, fewer than
// kQuantGemmRows rows; the K-quants have their own):
//   kStream  whole 512-bit steps of 2 or 4 blocks, fewest instructions per weight byte;
//   kRows    block by block with 256-bit dot products.
//   kAuto    (the default) by CPU and format: stream on AMD (Zen 4/5: two hyper-threads share one
//            core's vector units and the block-by-block loop could not keep up with memory); on
//            Intel stream for the 8- and 4-bit formats and rows for q5_0 / q5_1 (an AMX-era Xeon,
//            SmolLM2 decode: q8_0 157 -> 191 tokens/s and q4_0 245 -> 324 on stream; Q4_K_M, whose
//            K = 576 matrices are q5_0, 258 on rows against 244).
// PYXF_QUANT_GEMV=stream|rows|auto overrides the choice.
enum class QuantGemv : int { kRows = 0, kStream = 1, kAuto = 2 };
QuantGemv quant_gemv(QuantFormat f);  // the variant that serves format f
const char* quant_gemv_name();        // the setting: "rows", "stream" or "auto"
bool set_quant_gemv(const char* name);  // false for an unknown name

// How the avx512_bf16 table multiplies bf16 weights by kWidenRows or more rows (prefill, encoding,
// batches; fewer rows, decode, always take vdpbf16ps: half the weight bytes is what counts there):
//   kDot    vdpbf16ps on activations rounded to bf16 (and attention's products in bf16);
//   kWiden  FMAs on float activations, the pair panels' bf16 widened in registers (attention float);
//   kAuto   (the default) kDot on AMD (Zen 4/5: vdpbf16ps twice the multiply-adds of FMAs), kWiden
//           on Intel, whose vdpbf16ps issues at half FMA's rate (an AMX-era Xeon without the tiles
//           granted: SmolLM2 bf16 prefill at 0.69x float32's on vdpbf16ps).
// The avx512_amx table takes tiles from 16 rows either way. PYXF_BF16_GEMM=dot|widen|auto overrides.
enum class Bf16Gemm : int { kDot = 0, kWiden = 1, kAuto = 2 };
constexpr long kWidenRows = 16;
bool bf16_gemm_widens();               // whether many rows widen (the setting, resolved by CPU)
const char* bf16_gemm_name();          // the setting: "dot", "widen" or "auto"
bool set_bf16_gemm(const char* name);  // false for an unknown name

}  // namespace pyxf::kernels
