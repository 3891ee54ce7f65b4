// The learning loop around the gating model: scores with the live version, learns from
// each outcome as it arrives (one small step), retrains a candidate from logged history,
// validates it off-policy on the most recent decisions against what the live system did
// there and promotes it only when it is better (gate.h). The daemon and the replay
// benchmark drive the same Learner.
#pragma once

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "cortex/estimators.h"
#include "cortex/gate.h"
#include "cortex/gating.h"
#include "cortex/scorer.h"
#include "cortex/status.h"
#include "cortex/types.h"

namespace cortex {

struct LearnerOptions {
  GatingShape shape;
  // Retraining from history (Fit): at most `epochs` passes in time order, so the newest
  // outcomes are learned last (the streams drift; a shuffled order trains a model of the
  // window's average). The hashed linear part learns at 8: its per-feature gradients are
  // small (L2-normalised features, a minibatch mean, Adagrad accumulators from 0.1), and at
  // 1 it was still underfitting after 12 passes.
  TrainOptions train{4, 32, 0.2f, 8.0f, false};
  // The newest share of a retrain's rows held out to choose its number of passes (by
  // held-out log loss); then a fresh model makes that many on all rows. 0: always `epochs`.
  double validation_fraction = 0.1;
  // Candidates a retrain fits, variants of the trainer (population.h), keeping the one
  // whose validation slice scores best; 1: the trainer as configured, alone.
  int population = 1;
  TrainOptions online{1, 1, 0.05f, 1.0f, false};  // one step per outcome between retrains
  bool online_updates = true;
  int online_replay = 8;          // past outcomes revisited with each new one
  int replay_buffer = 2000;       // ... drawn from this many most recent
  float ips_clip = 2;             // importance weights are min(1/propensity, clip)
  double holdout_fraction = 0.2;  // most recent share of decisions held out
  int max_holdout = 2000;
  int max_examples = 50000;  // most recent outcomes a retrain learns from
  // A person's verdict weighs this many outcomes in its online step (and in each replay
  // of it): a few verdicts on an expert's tasks move its score without a retrain.
  float feedback_weight = 16;
};

// One outcome or verdict as online steps learn from it: featurized once, kept so for replay.
struct OnlineRow {
  SparseVector x;  // task features, unmasked
  std::string expert;
  float reward = 0;
  float weight = 1;
  float prior = 0;   // the manifest prior recorded with the decision
  std::string task;  // the attempt it is about: a verdict corrects its rows in the ring
  int attempt = 0;
};

// An activation's online learning: its weights after `step` steps (the last consumed event
// `seq`), and the replay ring and sampler the next step draws from. It is a pure function
// of the activation's saved weights and the learning events after it, so rebuilding it (a
// restart, `explain`) from a checkpoint and the same events gives the same bits.
struct OnlineState {
  GatingModel model;
  Activation live;
  long step = 0;
  long seq = 0;
  uint64_t rng = 0;
  std::vector<OnlineRow> ring;  // the event of step t sits in slot (t - 1) % replay_buffer
  // What steps touched since the last checkpoint (one flag per embedding row and wide
  // entry): a checkpoint after the first of an activation holds only those (a delta).
  std::vector<uint8_t> dirty_emb, dirty_wide;
};

// One candidate of a decision, recomputed by `explain`: the score and what moved it.
struct ExplainedCandidate {
  std::string expert;
  double model_score = 0;
  // Each task feature's push on the score's logit (words, pairs, 4-grams, tags), strongest
  // first: its linear weight plus what the hidden layer loses without it (leave one out).
  std::vector<std::pair<std::string, double>> features;
  double prior_part = 0;  // prior_w * prior + prior_b
};

// What Fit did: the passes it chose and the held-out loss after each pass it tried.
struct FitReport {
  int epochs = 0;
  int validation_rows = 0;  // 0: the slice was too small, so it made every pass
  std::vector<double> validation_loss;
};

struct RetrainResult {
  GatingModel model;
  ModelRecord record;  // version, status, trained_through, metrics JSON (no weights)
  bool promoted = false;
  std::string reason;
  long train_rows = 0, holdout_rows = 0;
  PolicyEstimate candidate, live, diff;  // values clipped to what they can be
  double agreement = 0;                  // share of held-out decisions picked alike
  // What was estimated: the held-out decisions and the candidate's pick on each (the
  // replay benchmark checks the estimate against the rewards it knows).
  std::vector<size_t> decisions;  // indices into the history
  std::vector<std::string> picks;
  FitReport fit;  // the passes the candidate was trained with
  // Population training: each variant fitted (name, passes, validation loss, eligible)
  // and the one kept.
  struct Fitted {
    std::string variant;
    FitReport fit;
    bool eligible = false;
    std::string why_not;     // when not eligible
    bool estimated = false;  // fitted, and estimated by the gate (reported, not decided on)
    double diff = 0;         // that estimate's difference against the live system
  };
  std::vector<Fitted> population;
  size_t chosen = 0;
  double seconds = 0;
};

// The live version's saved weights (never stepped online) and the last event they learned
// from: where a retrain's warm-start variant begins (population.h).
struct WarmStart {
  const GatingModel* model = nullptr;
  long trained_through = 0;
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

  // Expected rewards of `experts` for `tasks` under the live model (row-major B x E), and
  // which weights gave them (version, activation, step) with the priors they used.
  // Not reentrant: the router serialises calls.
  Status Score(const std::vector<SparseVector>& tasks, const std::vector<ExpertProfile>& experts,
               std::vector<float>* out, ScoreInfo* info);

  // One online step on the live model for a learning event it has not learned from yet.
  void Observe(const LoggedOutcome& o);
  // The live activation, its step and the last event it learned from.
  void LiveStep(Activation* live, long* step, long* seq) const;

  // Trains candidate `version` on `history` (oldest first, all outcomes known now) minus the
  // holdout, estimates it against the live system's logged picks on the holdout, and says
  // whether it should be promoted (gate.h: split, fit, estimate, decide, record). Runs
  // without blocking Score or Observe.
  // `warm`: for the population's warm-start variant; without, that variant is skipped.
  Result<RetrainResult> Retrain(const std::vector<LoggedOutcome>& history, int version, double now,
                                const std::function<void(const std::string&)>& progress = {},
                                WarmStart warm = {});
  // A candidate's greedy pick on each of `decisions` (held out from history[split]), made
  // as the live system made its own had the candidate gone live after `trained_through`:
  // each pick before it learns from that decision, then one online step per held-out
  // outcome in order (with online updates; else its weights as trained): the steps a
  // catch-up after its promotion takes (save that verdicts come applied to the outcomes
  // they judge, as a retrain reads them, rather than as steps of their own).
  Result<std::vector<std::string>> CandidatePicks(const GatingModel& model, long trained_through,
                                                  const std::vector<LoggedOutcome>& history,
                                                  size_t split,
                                                  const std::vector<size_t>& decisions,
                                                  const std::atomic<bool>* cancel = nullptr) const;

  // Makes `model` live as activation `live`: step 0, an empty ring. The events after
  // live.after_seq are then fed by Observe.
  void Install(GatingModel model, const Activation& live);
  // The same for a version that is not in a store (tests, the replay benchmark): live
  // after `trained_through`, then one step for each of `newer` after it.
  void Install(GatingModel model, int version, long trained_through,
               const std::vector<LoggedOutcome>& newer);
  // Makes a rebuilt state live (a restart from a checkpoint), unless a newer activation is
  // live by now.
  void Restore(OnlineState state);
  long trained_through() const;  // the last learning event the live weights learned from

  // A copy of the live model (for saving, or a final-policy evaluation).
  GatingModel Snapshot() const;
  // The live state as a checkpoint: its weights whole (`delta_base` < 0; clears the flags
  // of what the steps touch), or what changed since the whole checkpoint at step
  // `delta_base` (the last whole one this state made or was rebuilt from). When `activation`
  // is no longer live, only its id says which is (no weights, nothing cleared).
  Checkpoint MakeCheckpoint(long activation, long delta_base);

  // Rebuilding weights: a state at step 0 of `live` with `model`, or at a checkpoint
  // (`ring_events`: the newest min(step, replay_buffer) events up to its seq, oldest
  // first); then Step for each later event, in seq order.
  OnlineState Begin(GatingModel model, const Activation& live) const;
  // (`model`: the checkpoint's weights, its deltas applied.)
  Result<OnlineState> Resume(const Activation& live, const Checkpoint& c, GatingModel model,
                             const std::vector<LoggedOutcome>& ring_events) const;
  void Step(OnlineState* s, const LoggedOutcome& o) const;
  // Each candidate's model score under `m` for the task, with the recorded priors, on the
  // CPU (the bits the CPU scorer gave, whatever the batch), and its strongest features.
  std::vector<ExplainedCandidate> Explain(const GatingModel& m, const std::string& text,
                                          const Tags& tags,
                                          const std::vector<std::pair<std::string, float>>& cands,
                                          size_t top) const;

  // The batch trainer (retrains, and the replay's full-information baseline): trains `m`
  // on `set`, rows oldest first, with options().train. The newest validation_fraction of
  // the rows is held out while passes on the rest lower its weighted log loss (at most
  // train.epochs, stopping at the first pass that does not); then `m`, as it was given,
  // makes the best count of passes on all rows. Deterministic, as the engine. One at a
  // time with Retrain (they share the training engine).
  Status Fit(GatingModel* m, const TrainSet& set, FitReport* report = nullptr);

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

  void PutManifest(const std::string& expert, const SparseVector& manifest);  // under mu_

  OnlineRow RowOf(const LoggedOutcome& o) const;
  // (under train_mu_; `opt`: options().train or a population variant's)
  Status FitLocked(GatingModel* m, const TrainSet& set, const TrainOptions& opt, FitReport* report);
  // One online step on `s` (its owner holds whatever lock guards it), with `set` as scratch.
  void StepLocked(OnlineState* s, OnlineRow row, bool feedback, TrainSet* set,
                  GatingEngine* engine) const;

  LearnerOptions options_;
  FeatureHasher hasher_;
  std::unique_ptr<GatingEngine> score_engine_, train_engine_, online_engine_;
  // Lock order: observe_mu_, then mu_, then model_mu_.
  std::mutex observe_mu_;  // one online step or install at a time; online_set_
  mutable std::mutex mu_;  // manifests, the prior index
  // The live state: scoring reads it shared; an online step writes it exclusive for the
  // whole step (a few microseconds), so a score names exactly the step whose weights gave it.
  mutable std::shared_mutex model_mu_;
  OnlineState live_;
  long live_cutoff_ = 0;  // the live version's own cutoff, as installed (before online steps)
  std::map<std::string, SparseVector> manifests_;
  // Inverted index of the current experts' manifests: feature -> (expert column, weight),
  // rebuilt when the expert list changes; makes the prior cosines one lookup per feature.
  std::vector<std::string> prior_names_;
  std::vector<size_t> prior_sizes_;
  std::unordered_map<uint32_t, std::vector<std::pair<int, float>>> prior_index_;
  TrainSet online_set_;  // one online step's rows, reused (observe_mu_)
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
