#include <algorithm>

#include "cortex/scorer.h"

namespace cortex {
namespace {

class ManifestPriorScorer : public Scorer {
 public:
  std::string version() const override { return "prior-v1"; }
  std::string backend() const override { return "cpu"; }
  Status Score(const std::vector<SparseVector>& tasks, const std::vector<ExpertProfile>& experts,
               std::vector<float>* scores, ScoreInfo* info) override {
    *info = ScoreInfo{};
    info->version = this->version();
    const size_t b = tasks.size(), e = experts.size();
    scores->assign(b * e, 0.0f);
    for (size_t i = 0; i < b; ++i)
      for (size_t j = 0; j < e; ++j)
        (*scores)[i * e + j] = std::clamp(Dot(tasks[i], experts[j].manifest), 0.0f, 1.0f);
    return Status::OK();
  }
};

}  // namespace

std::unique_ptr<Scorer> MakeManifestPriorScorer() {
  return std::make_unique<ManifestPriorScorer>();
}

}  // namespace cortex
