// The batched scoring interface: B tasks x E experts -> a score matrix. The manifest
// prior and the learned gating model (CPU or cuBLAS, see learner.h) implement it.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "cortex/features.h"
#include "cortex/status.h"

namespace cortex {

// Which weights scored a batch: the model version, and for a learned model the
// activation and online step (Decision::model_live, model_step) and the manifest priors it
// used (row-major like the scores; empty when the scorer has none).
struct ScoreInfo {
  std::string version;
  long live = 0;
  long step = -1;
  std::vector<float> priors;
};

struct ExpertProfile {
  std::string name;
  SparseVector manifest;
};

class Scorer {
 public:
  virtual ~Scorer() = default;
  // Recorded with every decision this scorer takes part in.
  virtual std::string version() const = 0;
  // "cpu", or "cuda:<device>".
  virtual std::string backend() const = 0;
  // Fills `scores` (row-major, tasks.size() x experts.size()) with values in [0,1], and
  // `info` with the weights that produced them (they can change between calls).
  virtual Status Score(const std::vector<SparseVector>& tasks,
                       const std::vector<ExpertProfile>& experts, std::vector<float>* scores,
                       ScoreInfo* info) = 0;
};

// Zero-shot score: cosine similarity between the task's and the manifest's features.
std::unique_ptr<Scorer> MakeManifestPriorScorer();

}  // namespace cortex
