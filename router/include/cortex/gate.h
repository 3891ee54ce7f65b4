// A retrain in small parts, each a function testable alone; Learner::Retrain runs them in
// order: split -> fit (the training engine) -> estimate -> decide -> record.
//
// The gate compares a candidate with what the live system actually did on the newest
// decisions, which neither the candidate nor that system's choices had learned from when
// they were made: the baseline is each held-out decision's logged greedy pick, worth the
// reward its log observed; the candidate's picks are made as the live system made its
// own (progressively: a pick, then one online step on that decision's outcomes). A pick
// the log has no reward for is worth what the live system knew then (the model scores
// the decision recorded), the same reference for both policies. A fair gate can promote
// only what is better: on the replays, few of today's candidates are (`cortex-bench replay
// -v` prints each retrain's estimate beside the truth, which the replay knows).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "cortex/estimators.h"
#include "cortex/types.h"

namespace cortex {

// Fewer held-out decisions than this give an interval too wide to decide on.
constexpr size_t kMinGateDecisions = 20;

// split: the newest `holdout_fraction` of a retrain's outcomes (at most `max_holdout`) are
// held out; it trains on the newest `max_examples` before them.
struct RetrainSplit {
  size_t begin = 0;  // [begin, split) trains
  size_t split = 0;  // [split, end) validates
  size_t end = 0;
};
RetrainSplit SplitOutcomes(size_t outcomes, double holdout_fraction, size_t max_holdout,
                           size_t max_examples);

// The held-out decisions among history[split..] (oldest first): the router's own first
// attempts (not forced, drawn with a known propensity), as indices into the history.
// Feedback events are not decisions (a retrain's history carries rewards with verdicts
// applied); fallback attempts are left out of the estimate (LoggedPickValue says why).
std::vector<size_t> HeldOutDecisions(const std::vector<LoggedOutcome>& history, size_t split);

// The greedy pick among a decision's candidates for a model's `scores` (one per candidate)
// plus each candidate's rule score, ties to the smaller name: as Route picks.
size_t GreedyPick(const std::vector<LoggedCandidate>& candidates, const std::vector<float>& scores);

// estimate: the candidate's picks and the logged greedy ones valued by LoggedPickValue
// (the recorded model scores as reference), paired per decision.
struct GateEstimate {
  PolicyEstimate candidate, live, diff;  // live: the live system's picks, as they were made
  double agreement = 0;                  // share of decisions where the two picks are the same
};
GateEstimate EstimateAgainstLogged(const std::vector<LoggedOutcome>& history,
                                   const std::vector<size_t>& decisions,
                                   const std::vector<std::string>& candidate_picks, double clip);

// decide: promote only a candidate estimated better than the live system (a paired
// difference above zero), on enough decisions; or a stale live version (below).
struct GateInputs {
  size_t decisions = 0;
  double diff = 0;
  // The live version is caught up with online steps on every outcome after its cutoff when
  // cortexd starts (or another node loads it). While candidates keep being refused that
  // cutoff stays put, so once it is older than the retrain's first outcome (with a full
  // window read) the candidate is promoted whatever its estimate: a start then replays
  // about a window at most. Without online updates nothing is replayed.
  bool online_updates = true;
  bool full_window = false;
  long live_cutoff = 0;
  long first_seq = 0;  // the retrain's oldest outcome
};
struct GateVerdict {
  bool promoted = false;
  std::string reason;
};
GateVerdict DecidePromotion(const GateInputs& in);

// record: the metrics JSON a model version carries (`cortexctl models`, `retrain --wait`,
// the report read estimator, baseline, candidate, live, diff, reason).
struct RetrainFacts {
  long train_rows = 0, holdout_rows = 0;
  GateEstimate estimate;
  GateVerdict verdict;
  bool progressive = true;  // the candidate learned online through the holdout
  double clip = 0;
  std::string backend;
  int epochs = 0, max_epochs = 0;           // the passes made (chosen by Learner::Fit), the bound
  int fit_validation_rows = 0;              // the newest training rows Fit chose the passes on
  std::vector<double> fit_validation_loss;  // their log loss after each pass it tried
  // Population training (population.h): each variant fitted, and the one kept.
  struct Member {
    std::string variant;
    int epochs = 0;
    double loss = 0;  // on the validation slice, when eligible
    bool eligible = false;
    std::string why_not;
    bool estimated = false;
    double diff = 0;  // its gate estimate against the live system (reported only)
  };
  std::vector<Member> population;
  size_t chosen = 0;
  double seconds = 0;
  int live_version = 0;
  long live_cutoff = 0;
};
std::string RetrainMetrics(const RetrainFacts& f);

}  // namespace cortex
