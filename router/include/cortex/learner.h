// The learning loop around the gating model: scores with the live version, learns from
// each outcome as it arrives (one small step), retrains a candidate from logged history,
// validates it off-policy on the most recent decisions and promotes it only when it is not
// worse. The daemon and the replay benchmark drive the same Learner.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "cortex/gating.h"
#include "cortex/scorer.h"
#include "cortex/types.h"

namespace cortex {

struct LearnerOptions {
  GatingShape shape;
  TrainOptions train;                             // retraining from history
  TrainOptions online{1, 1, 0.05f, 1.0f, false};  // one step per outcome between retrains
  bool online_updates = true;
  int online_replay = 8;          // past outcomes revisited with each new one
  int replay_buffer = 2000;       // ... drawn from this many most recent
  float ips_clip = 2;             // importance weights are min(1/propensity, clip)
  double holdout_fraction = 0.2;  // most recent share of decisions held out
  int max_holdout = 2000;
  int max_examples = 50000;  // most recent outcomes a retrain learns from
};

// Off-policy estimate (doubly robust) of a policy's mean reward, with a 95% interval.
struct PolicyEstimate {
  double value = 0;
  double ci = 0;  // half-width
};

struct RetrainResult {
  GatingModel model;
  ModelRecord record;  // version, status, trained_through, metrics JSON (no weights)
  bool promoted = false;
  std::string reason;
  long train_rows = 0, holdout_rows = 0;
  PolicyEstimate candidate, live, diff;
  double seconds = 0;
};

class Learner {
 public:
  Learner(LearnerOptions options, FeatureHasher hasher, std::unique_ptr<GatingEngine> score_engine,
          std::unique_ptr<GatingEngine> train_engine);

  const FeatureHasher& hasher() const { return hasher_; }
  const LearnerOptions& options() const { return options_; }
  std::string backend() const { return score_engine_->backend(); }
  int live_version() const;
  static std::string VersionName(int version) { return "v" + std::to_string(version); }

  // Expected rewards of `experts` for `tasks` under the live model (row-major B x E).
  // Not reentrant: the router serialises calls.
  Status Score(const std::vector<SparseVector>& tasks, const std::vector<ExpertProfile>& experts,
               std::vector<float>* out, std::string* version);

  // One online step on the live model for an outcome it has not learned from yet.
  void Observe(const LoggedOutcome& o);

  // Trains candidate `version` on `history` (oldest first, all outcomes known now) minus the
  // holdout, estimates it and the live model (as it is now) on the holdout, and says
  // whether it should be promoted. Runs without blocking Score; Observe waits only while
  // the live model scores the holdout (one batch).
  Result<RetrainResult> Retrain(const std::vector<LoggedOutcome>& history, int version, double now,
                                const std::function<void(const std::string&)>& progress = {});

  // Makes `model` live and brings it up to date with `newer` (outcomes after its cutoff).
  void Install(GatingModel model, int version, long trained_through,
               const std::vector<LoggedOutcome>& newer);
  long trained_through() const;

  // A copy of the live model (for saving, or a final-policy evaluation).
  GatingModel Snapshot() const;

  // Builds training rows (features, priors, importance weights) from logged outcomes.
  TrainSet MakeTrainSet(const std::vector<LoggedOutcome>& outcomes, size_t begin, size_t end);
  void SetManifest(const std::string& expert, const SparseVector& manifest);

 private:
  // Copies of the manifests of `experts` known so far (locks briefly).
  std::map<std::string, SparseVector> ManifestsOf(const std::vector<std::string>& experts) const;
  // Cosine between task features and the manifest of `expert` (0 if never seen).
  static float PriorOf(const std::map<std::string, SparseVector>& manifests, const SparseVector& x,
                       const std::string& expert);
  // A training row's reward (clamped to [0, 1]) and importance weight.
  static float RewardOf(const LoggedOutcome& o);
  float WeightOf(const LoggedOutcome& o) const;

  // Sets the manifest of `expert` (under mu_); a change of any bit moves manifests_gen_.
  void PutManifest(const std::string& expert, const SparseVector& manifest);

  // An outcome as online steps learn from it: featurized once, when it arrives, and kept
  // so for replay. Each step uses its prior under the manifests of that step: the one kept
  // is reused only while they have not changed (same manifests_gen_), else computed anew.
  struct OnlineRow {
    SparseVector x;  // task features, unmasked (the prior's cosine reads them)
    std::string expert;
    float reward = 0;
    float weight = 1;
    float prior = 0;
    uint64_t prior_gen = 0;  // manifests_gen_ the prior was computed under (0: not yet)
  };
  // One online step (Observe), observe_mu_ held.
  void ObserveLocked(const LoggedOutcome& o);
  // Appends `row` to online_set_ (under mu_).
  void AddOnlineRow(OnlineRow& row);

  LearnerOptions options_;
  FeatureHasher hasher_;
  std::unique_ptr<GatingEngine> score_engine_, train_engine_, online_engine_;
  // Lock order: observe_mu_, then mu_, then model_mu_.
  std::mutex observe_mu_;  // one online step or install at a time; online_set_
  mutable std::mutex mu_;  // version, manifests, the replay ring, the live model's shape
  // The live model's weights: scoring reads them shared; an online step writes them
  // exclusive only for each update (TrainOptions::lock), so a trainer held up mid-step
  // (it runs at nice 19) does not hold up routing.
  mutable std::shared_mutex model_mu_;
  GatingModel live_;
  int version_ = 0;
  long trained_through_ = 0;
  long live_cutoff_ = 0;  // the live version's own cutoff, as installed (before online steps)
  std::map<std::string, SparseVector> manifests_;
  uint64_t manifests_gen_ = 1;  // moves with every change to manifests_
  // Inverted index of the current experts' manifests: feature -> (expert column, weight),
  // rebuilt when the expert list changes; makes the prior cosines one lookup per feature.
  std::vector<std::string> prior_names_;
  std::vector<size_t> prior_sizes_;
  std::unordered_map<uint32_t, std::vector<std::pair<int, float>>> prior_index_;
  std::vector<OnlineRow> recent_;  // ring buffer for online replay
  TrainSet online_set_;            // one online step's rows, reused (observe_mu_)
  size_t recent_next_ = 0;
  uint64_t replay_rng_ = 0;
  std::mutex train_mu_;  // one retrain at a time
};

// A Scorer over the learner's live model.
std::unique_ptr<Scorer> MakeGatingScorer(std::shared_ptr<Learner> learner);

// Opens the engine `backend` asks for: "cpu", "cuda", or "auto" (cuda when a working GPU
// is present, else cpu). `why` says what auto decided, or why cuda failed.
Result<std::unique_ptr<GatingEngine>> MakeEngine(const std::string& backend, std::string* why);

// Decides when to retrain: at least `min_new` new outcomes and `interval_s` since the last.
class RetrainSchedule {
 public:
  RetrainSchedule(double interval_s, long min_new) : interval_s_(interval_s), min_new_(min_new) {}
  bool Due(long new_outcomes, double now) const {
    return new_outcomes >= min_new_ && now - last_ >= interval_s_;
  }
  void Done(double now) { last_ = now; }

 private:
  double interval_s_;
  long min_new_;
  double last_ = -1e300;
};

}  // namespace cortex
