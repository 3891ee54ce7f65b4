// The learned gating model: for task features x and expert e it estimates the expected
// reward  r(x,e) = sigmoid(z), with
//
//   z = prior_b + prior_w * cos(x, manifest_e)        calibrated manifest prior (any expert)
//     + sum_i x_i * wide[mix(i, e)]                     per-expert hashed linear part
//     + head_e . tanh(Emb^T x + b1) + bias_e            MLP: sparse input layer, per-expert head
//
// An expert never seen in training has zero wide and head parts, so it is scored by the
// calibrated prior alone; its learned parts take over as its outcomes arrive. Experts are
// keyed by name, so they can come and go without retraining.
//
// Parameters live on the host (GatingModel); an Engine computes with them on the CPU
// (BLAS) or on a GPU (cuBLAS + small kernels). Both give the same answer within 1e-4.
#pragma once

#include <atomic>

#include <cstdint>
#include <map>
#include <memory>
#include <shared_mutex>
#include <string>
#include <vector>

#include "cortex/features.h"
#include "cortex/status.h"

namespace cortex {

namespace blob {  // gating_model.cc's byte writer and reader
class Writer;
class Reader;
}  // namespace blob

struct GatingShape {
  int bits = 18;       // input hash space of the MLP: 2^bits rows of Emb
  int hidden = 32;     // width of the hidden layer
  int wide_bits = 20;  // size of the hashed per-expert linear table
  uint64_t seed = 1;   // deterministic initialisation and training order
};

struct ExpertHead {
  std::vector<float> w;  // hidden
  float bias = 0;
};

class GatingModel {
 public:
  GatingModel() = default;
  explicit GatingModel(const GatingShape& shape);

  const GatingShape& shape() const { return shape_; }
  int hidden() const { return shape_.hidden; }
  size_t rows() const { return size_t{1} << shape_.bits; }
  size_t wide_size() const { return size_t{1} << shape_.wide_bits; }

  // Parameters (public: the engines and the trainer work on them directly).
  std::vector<float> emb;  // rows() x hidden, row-major
  std::vector<float> b1;   // hidden
  std::vector<float> wide;
  std::map<std::string, ExpertHead> heads;
  float prior_w = 6.0f;  // untrained guess: a perfect manifest match means ~0.5 reward
  float prior_b = -3.0f;

  // Adagrad state, saved with the model so a reloaded version learns on exactly as before.
  std::vector<float> g_emb, g_b1, g_wide;
  std::map<std::string, std::vector<float>> g_heads;  // hidden + 1 (bias last)
  float g_prior_w = 0, g_prior_b = 0;

  // Unique per state (process-wide counter), so an engine holding a device copy knows
  // when to refresh it, even when another model is moved into the same object.
  uint64_t stamp = 0;
  static uint64_t NextStamp();

  // Head of `expert`, or nullptr if it has never been trained.
  const ExpertHead* Head(const std::string& expert) const;
  ExpertHead* MutableHead(const std::string& expert);
  // Index into `wide` for feature `i` of the expert with key `ekey`: a multiplicative hash
  // of the feature's mix and the expert key, so a scorer mixes each feature once per task.
  size_t WideIndex(uint32_t i, uint64_t ekey) const;
  static uint64_t FeatureMix(uint32_t i);
  static size_t WideSlot(uint64_t feature_mix, uint64_t ekey, int wide_bits) {
    return static_cast<size_t>(((feature_mix ^ ekey) * 0x9E3779B97F4A7C15ULL) >> (64 - wide_bits));
  }
  static uint64_t ExpertKey(const std::string& name);

  // Compact binary form: only Emb rows that differ from their seeded initial value.
  std::string Serialize() const;
  static Result<GatingModel> Deserialize(const std::string& blob);
  // A delta: the small parameters whole and only the embedding rows and wide entries
  // flagged (those an online step touched since the checkpoint at `base_step`); applied to
  // that checkpoint's weights it gives these. DeltaBase: whether a blob is one, and its base.
  std::string SerializeDelta(int64_t base_step, const std::vector<uint8_t>& emb_rows,
                             const std::vector<uint8_t>& wide_entries) const;
  static bool DeltaBase(const std::string& blob, int64_t* base_step);
  Status ApplyDelta(const std::string& blob);
  size_t TouchedRows() const;

 private:
  void InitState();
  void WriteHeader(blob::Writer* w, const char* magic) const;
  void WriteBody(blob::Writer* w, const std::vector<uint32_t>& rows_out,
                 const std::vector<uint32_t>& wide_out) const;
  Status ReadBody(blob::Reader* r);
  GatingShape shape_;
};

// A batch of sparse task vectors in CSR form (indices already in [0, 2^bits)).
struct SparseBatch {
  std::vector<int> offsets{0};
  std::vector<uint32_t> idx;
  std::vector<float> val;
  int rows() const { return static_cast<int>(offsets.size()) - 1; }
  void Add(const SparseVector& v, uint32_t mask);
};

// One logged outcome, ready for training: the expert's column in the batch's expert list.
struct TrainRow {
  int x = 0;         // row of the SparseBatch
  int expert = 0;    // column in TrainSet::experts
  float prior = 0;   // cos(task, manifest of that expert)
  float reward = 0;  // in [0,1]
  float weight = 1;  // importance weight (clipped 1/propensity)
};

struct TrainSet {
  SparseBatch x;
  std::vector<std::string> experts;
  std::vector<TrainRow> rows;
};

struct TrainOptions {
  int epochs = 4;
  int batch = 32;
  float lr = 0.2f;       // Adagrad step for the MLP
  float lr_wide = 1.0f;  // Adagrad step for the hashed linear part
  bool shuffle = true;   // seeded shuffle per epoch
  // The number of the first epoch (its seeded order): a caller that runs epochs one call
  // at a time (Learner::Fit, to validate after each) gets the orders of a single call.
  int first_epoch = 0;
  // Set by the owner (cortexd, when it stops): training ends within one minibatch.
  const std::atomic<bool>* cancel = nullptr;
  // The model's lock, when it is scored while it trains (online steps on the live model):
  // each minibatch reads under it shared and writes under it exclusive, so scoring waits
  // only for the writes. (CPU engine; null: the model is the trainer's alone.)
  std::shared_mutex* lock = nullptr;
};

class GatingEngine {
 public:
  virtual ~GatingEngine() = default;
  // "cpu" or "cuda:<n> (<device name>)".
  virtual std::string backend() const = 0;
  // Expected rewards, row-major tasks x experts. `prior` holds the cosines, same shape.
  virtual Status Score(const GatingModel& m, const SparseBatch& x,
                       const std::vector<std::string>& experts, const std::vector<float>& prior,
                       std::vector<float>* out) = 0;
  // Minibatch Adagrad on the weighted cross-entropy of the logged rows, in place.
  virtual Status Train(GatingModel* m, const TrainSet& data, const TrainOptions& opt) = 0;
};

std::unique_ptr<GatingEngine> MakeCpuEngine();
// Fails (with the reason) when the build has no CUDA or no usable GPU is present.
Result<std::unique_ptr<GatingEngine>> MakeCudaEngine();
// Whether this binary was built with the CUDA backend.
bool CudaBuilt();

// How the scoring GEMM (B x H times H x E) does against cuBLAS's own SGEMM peak on this card.
struct GemmReport {
  std::string shape;
  double ours_gflops = 0, ours_gbytes = 0, peak_gflops = 0;
};
Result<GemmReport> CudaGemmProbe(int B, int H, int E);

// Shared by both engines: the deterministic per-epoch order of `n` rows.
std::vector<int> EpochOrder(size_t n, uint64_t seed, int epoch, bool shuffle);

}  // namespace cortex
