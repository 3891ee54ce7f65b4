// Off-policy estimators, each a small pure function tested against hand-computed answers:
// what a policy that did not make the logged decisions would have earned on them.
#pragma once

#include <vector>

namespace cortex {

// A policy's mean reward, with a 95% interval.
struct PolicyEstimate {
  double value = 0;
  double ci = 0;  // half-width: 1.96 standard errors
};

// The mean of per-decision estimates and its normal 95% interval (none for one value).
PolicyEstimate MeanCi(const std::vector<double>& per_decision);

// Doubly robust, one decision: the reward model's estimate for the policy's pick `q_pick`,
// plus, when the pick is the logged one, the model's error on the logged reward weighted
// by the inverse propensity. Unbiased when either the model or the propensity is right.
double DoublyRobust(double q_pick, bool pick_is_logged, double reward, double q_logged,
                    double propensity);

// What one held-out decision's log says a pick earned, for a gate that pairs two policies
// on the same decisions (the retrain's candidate and the live system as it was): when the
// pick is the first attempt's expert, doubly robust on its observed reward with `q_pick`
// (the reference's estimate) as the control and the importance weight 1/propensity
// clipped at `clip` (an explored pick's weight can be in the hundreds); else `q_pick`.
// The reference must be what the live system knew when it decided (the model scores the
// decision recorded), never the policy being evaluated: a candidate scored by its own
// model is worth its own best score wherever it disagrees with the log, which flatters
// every candidate that is sure of itself (by about 0.1 on the replays).
// A fallback attempt's reward is not used: it is observed only when the first attempt
// failed, so it is worth more than the pick's average (on the replays it flattered
// candidates by about 0.013, enough to promote half of them and lose online success).
double LoggedPickValue(double q_pick, bool pick_is_logged, double reward, double propensity,
                       double clip);

}  // namespace cortex
