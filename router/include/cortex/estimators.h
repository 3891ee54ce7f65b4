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

}  // namespace cortex
