#include "cortex/gate.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

namespace cortex {

RetrainSplit SplitOutcomes(size_t n, double holdout_fraction, size_t max_holdout,
                           size_t max_examples) {
  const size_t holdout = std::min<size_t>(
      max_holdout, static_cast<size_t>(std::llround(static_cast<double>(n) * holdout_fraction)));
  RetrainSplit s;
  s.end = n;
  s.split = n - std::min(holdout, n);
  s.begin = s.split > max_examples ? s.split - max_examples : 0;
  return s;
}

std::vector<size_t> HeldOutDecisions(const std::vector<LoggedOutcome>& history, size_t split) {
  std::vector<size_t> out;
  for (size_t i = split; i < history.size(); ++i) {
    const LoggedOutcome& o = history[i];
    if (o.attempt == 1 && !o.feedback && !o.forced && o.propensity > 0 && !o.candidates.empty())
      out.push_back(i);
  }
  return out;
}

size_t GreedyPick(const std::vector<LoggedCandidate>& c, const std::vector<float>& scores) {
  size_t best = 0;
  double best_s = -1e300;
  for (size_t k = 0; k < c.size(); ++k) {
    const double s = (k < scores.size() ? scores[k] : 0.0) + c[k].rule_score;
    if (s > best_s || (s == best_s && c[k].expert < c[best].expert)) best_s = s, best = k;
  }
  return best;
}

GateEstimate EstimateAgainstLogged(const std::vector<LoggedOutcome>& history,
                                   const std::vector<size_t>& decisions,
                                   const std::vector<std::string>& picks, double clip) {
  std::vector<double> cand, live, diff;
  long same = 0;
  for (size_t k = 0; k < decisions.size() && k < picks.size(); ++k) {
    const LoggedOutcome& o = history[decisions[k]];
    auto value = [&](const std::string& pick) {
      double q = 0;  // an expert the decision did not score: nothing known, no reward
      for (const auto& c : o.candidates)
        if (c.expert == pick) q = std::clamp(c.model_score, 0.0, 1.0);
      return LoggedPickValue(q, pick == o.expert, std::clamp(o.reward, 0.0, 1.0), o.propensity,
                             clip);
    };
    // A decision logged before greedy picks were recorded: the logged pick stands in.
    const std::string& greedy = o.greedy.empty() ? o.expert : o.greedy;
    cand.push_back(value(picks[k]));
    live.push_back(value(greedy));
    diff.push_back(cand.back() - live.back());
    same += picks[k] == greedy;
  }
  GateEstimate e;
  e.candidate = MeanCi(cand);
  e.live = MeanCi(live);
  e.diff = MeanCi(diff);
  e.agreement = cand.empty() ? 0 : static_cast<double>(same) / static_cast<double>(cand.size());
  return e;
}

GateVerdict DecidePromotion(const GateInputs& in) {
  GateVerdict v;
  const bool stale = in.online_updates && in.full_window && in.live_cutoff < in.first_seq - 1;
  if (in.decisions < kMinGateDecisions) {
    v.reason = "too few held-out decisions to validate: " + std::to_string(in.decisions) +
               ", at least " + std::to_string(kMinGateDecisions) + " are needed";
  } else if (in.diff > 0) {
    v.promoted = true;
    v.reason = "candidate estimated better than the live system";
  } else if (stale) {
    v.promoted = true;
    v.reason =
        "candidate not estimated better than the live system, but the live version's "
        "cutoff (" +
        std::to_string(in.live_cutoff) + ") is older than this retrain's outcomes (from " +
        std::to_string(in.first_seq) +
        "): promoted, so that catching up after a restart stays within that window";
  } else {
    v.reason = in.diff == 0 ? "candidate estimated no better than the live system (the same picks)"
                            : "candidate estimated worse than the live system";
  }
  return v;
}

namespace {

// The 95% interval as bounds too, clipped to what the quantity can be (a policy's mean
// reward lies in [0, 1], a difference of two in [-1, 1]): a small holdout's half-width can
// exceed the whole range, and an interval outside it would only mislead. `e` is the
// unclipped estimate: the value shown is clipped, and the bounds are the clipped ends of
// its own interval, so value and interval never disagree.
nlohmann::json EstimateJson(const PolicyEstimate& e, double lo, double hi) {
  // "+ 0.0": a -0.0 shows as 0.
  return {{"value", std::clamp(e.value, lo, hi) + 0.0},
          {"ci", e.ci},
          {"low", std::clamp(e.value - e.ci, lo, hi) + 0.0},
          {"high", std::clamp(e.value + e.ci, lo, hi) + 0.0}};
}

std::string Num(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%g", v);
  return b;
}

}  // namespace

std::string RetrainMetrics(const RetrainFacts& f) {
  const GateEstimate& e = f.estimate;
  // The importance-corrected term can take a value out of the reward range on few rows; a
  // policy's value cannot leave it, so it is shown clipped (the decision uses the difference).
  const bool clipped =
      e.candidate.value < 0 || e.candidate.value > 1 || e.live.value < 0 || e.live.value > 1;
  nlohmann::json m = {
      {"train_rows", f.train_rows},
      {"holdout_rows", f.holdout_rows},
      {"estimator",
       "paired per decision: the logged first attempt's reward (doubly robust, importance "
       "weights clipped at " +
           Num(f.clip) + "), else the model scores the decision recorded; 95% interval"},
      {"baseline", "the live system's greedy picks, as it made them"},
      {"candidate_policy", f.progressive ? "progressive: one online step per held-out outcome"
                                         : "static: its trained weights"},
      {"candidate", EstimateJson(e.candidate, 0, 1)},
      {"live", EstimateJson(e.live, 0, 1)},
      {"diff", EstimateJson(e.diff, -1, 1)},
      {"agreement", e.agreement},
      {"promoted", f.verdict.promoted},
      {"reason", f.verdict.reason},
      {"min_holdout_rows", kMinGateDecisions},
      {"clipped", clipped},
      {"backend", f.backend},
      {"epochs", f.epochs},
      {"max_epochs", f.max_epochs},
      {"fit_validation_rows", f.fit_validation_rows},
      {"fit_validation_loss", f.fit_validation_loss},
      {"seconds", f.seconds},
      {"live_version_at_training", f.live_version},
      {"live_cutoff", f.live_cutoff}};
  if (f.population.size() > 1) {
    nlohmann::json pop = nlohmann::json::array();
    for (const auto& p : f.population) {
      nlohmann::json e = {{"variant", p.variant}, {"epochs", p.epochs}, {"eligible", p.eligible}};
      if (p.eligible)
        e["validation_loss"] = p.loss;
      else
        e["why_not"] = p.why_not;
      if (p.estimated) e["diff"] = p.diff;
      pop.push_back(std::move(e));
    }
    m["population"] = std::move(pop);
    m["kept"] = f.population[f.chosen].variant;
  }
  return m.dump();
}

}  // namespace cortex
