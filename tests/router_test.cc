#include <gtest/gtest.h>

#include <cmath>

#include <algorithm>
#include <map>
#include <random>

#include "cortex/estimators.h"
#include "cortex/explore.h"
#include "cortex/gate.h"
#include "cortex/population.h"
#include "cortex/router.h"

namespace cortex {
namespace {

ExpertSlot Slot(const FeatureHasher& h, const std::string& name, std::vector<std::string> keywords,
                double load = 0) {
  return {{name, h.Manifest({name, "", keywords, {}})}, load};
}

RuleSet Rules(const std::string& yaml_like_name, const std::vector<std::string>& match,
              const std::string& expert, double boost, bool force) {
  RuleConfig r;
  r.name = yaml_like_name;
  r.match = match;
  r.expert = expert;
  r.boost = boost;
  r.force = force;
  return RuleSet::Compile({r}, "t.yaml").value();
}

TEST(FeaturesTest, NormalisedSortedAndSharedByPrefixes) {
  FeatureHasher h;
  SparseVector a = h.Task("Found a vulnerability in the parser", {});
  SparseVector b = h.Manifest({"sec", "", {"vulnerab"}, {}});
  SparseVector c = h.Manifest({"docs", "", {"documentation", "readme"}, {}});
  ASSERT_TRUE(std::is_sorted(a.idx.begin(), a.idx.end()));
  EXPECT_NEAR(Dot(a, a), 1.0, 1e-5);
  EXPECT_GT(Dot(a, b), 0.05);  // character n-grams carry "vulnerab" into "vulnerability"
  EXPECT_LT(Dot(a, c), Dot(a, b));
  EXPECT_TRUE(h.Task("", {}).idx.empty());
  EXPECT_EQ(FeatureHasher::Words("Fix the LOGIN-bug!"),
            (std::vector<std::string>{"fix", "login", "bug"}));
}

TEST(FeaturesTest, TagsBecomeFeatures) {
  FeatureHasher h;
  EXPECT_LT(Dot(h.Task("x", {{"team", "a"}}), h.Task("x", {{"team", "b"}})), 0.99);
}

TEST(RouterTest, ManifestPriorPrefersTheMatchingExpert) {
  Router r(RouterOptions{0, 0.2, 1}, RuleSet(), MakeManifestPriorScorer());
  std::vector<ExpertSlot> ex = {Slot(r.hasher(), "docs", {"documentation", "readme", "typo"}),
                                Slot(r.hasher(), "perf", {"performance", "faster", "slow"})};
  std::vector<Decision> d;
  ASSERT_TRUE(
      r.Route({{"fix typo in readme", {}}, {"make the parser faster", {}}}, ex, true, 0, &d).ok());
  ASSERT_EQ(d.size(), 2u);
  EXPECT_EQ(d[0].chosen, "docs");
  EXPECT_EQ(d[1].chosen, "perf");
  EXPECT_EQ(d[0].model_version, "prior-v1");
  // The confidence shown is the model's own estimate, untouched by rules or load.
  for (const auto& c : d[0].candidates) EXPECT_DOUBLE_EQ(c.confidence, c.model_score);
  EXPECT_GT(d[0].Find("docs")->confidence, d[0].Find("perf")->confidence);
  EXPECT_DOUBLE_EQ(d[0].propensity, 1.0);
}

TEST(RouterTest, BatchEqualsOneByOne) {
  Router r(RouterOptions{0, 0.2, 1}, RuleSet(), MakeManifestPriorScorer());
  std::vector<ExpertSlot> ex = {Slot(r.hasher(), "a", {"alpha", "login"}),
                                Slot(r.hasher(), "b", {"beta", "bug"}),
                                Slot(r.hasher(), "c", {"gamma"})};
  std::vector<RouteRequest> reqs = {{"login bug", {}}, {"alpha beta", {}}, {"nothing", {}}};
  std::vector<Decision> batch;
  ASSERT_TRUE(r.Route(reqs, ex, false, 0, &batch).ok());
  for (size_t i = 0; i < reqs.size(); ++i) {
    std::vector<Decision> one;
    ASSERT_TRUE(r.Route({reqs[i]}, ex, false, 0, &one).ok());
    ASSERT_EQ(one[0].candidates.size(), batch[i].candidates.size());
    for (size_t j = 0; j < one[0].candidates.size(); ++j) {
      EXPECT_EQ(one[0].candidates[j].expert, batch[i].candidates[j].expert);
      EXPECT_DOUBLE_EQ(one[0].candidates[j].score, batch[i].candidates[j].score);
    }
  }
}

TEST(RouterTest, RuleBoostAndRecordsFiredRules) {
  Router r(RouterOptions{0, 0.2, 1}, Rules("sec", {"cve", "/\\bxss\\b/"}, "security", 2.0, false),
           MakeManifestPriorScorer());
  std::vector<ExpertSlot> ex = {Slot(r.hasher(), "docs", {"xss docs"}),
                                Slot(r.hasher(), "security", {"audit"})};
  std::vector<Decision> d;
  ASSERT_TRUE(r.Route({{"XSS in the docs page", {}}}, ex, true, 0, &d).ok());
  EXPECT_EQ(d[0].chosen, "security");
  const Candidate* c = d[0].Find("security");
  EXPECT_DOUBLE_EQ(c->rule_score, 2.0);
  EXPECT_EQ(c->rules, std::vector<std::string>{"sec"});
  EXPECT_DOUBLE_EQ(c->score, c->rule_score + c->model_score);
  ASSERT_TRUE(r.Route({{"xssfoo docs", {}}}, ex, true, 0, &d).ok());  // \b keeps it from firing
  EXPECT_TRUE(d[0].Find("security")->rules.empty());
}

TEST(RouterTest, ForceRuleWinsEvenAgainstExploration) {
  Router r(RouterOptions{1.0, 0.2, 1}, Rules("gdpr", {"/\\bgdpr\\b/"}, "security", 0, true),
           MakeManifestPriorScorer());
  std::vector<ExpertSlot> ex = {Slot(r.hasher(), "docs", {"gdpr docs", "gdpr"}),
                                Slot(r.hasher(), "security", {})};
  for (int i = 0; i < 20; ++i) {
    std::vector<Decision> d;
    ASSERT_TRUE(r.Route({{"GDPR request for the docs", {}}}, ex, true, 0, &d).ok());
    EXPECT_EQ(d[0].chosen, "security");
    EXPECT_TRUE(d[0].forced);
    EXPECT_EQ(d[0].candidates[0].expert, "security");
    EXPECT_DOUBLE_EQ(d[0].propensity, 1.0);
  }
}

TEST(RouterTest, AForcedExpertThatIsNotLoadedStillLeadsAloneAndIsNeverGreedy) {
  Router r(RouterOptions{1.0, 0.2, 1}, Rules("sox", {"sox"}, "auditor", 0.5, true),
           MakeManifestPriorScorer());
  std::vector<ExpertSlot> ex = {Slot(r.hasher(), "docs", {"sox docs"}),
                                Slot(r.hasher(), "security", {})};
  std::vector<Decision> d;
  ASSERT_TRUE(r.Route({{"SOX report for the docs", {}}}, ex, true, 0, &d).ok());
  EXPECT_TRUE(d[0].forced);
  EXPECT_EQ(d[0].chosen, "auditor");
  ASSERT_EQ(d[0].candidates.size(), 3u);
  EXPECT_EQ(d[0].candidates[0].expert, "auditor");
  EXPECT_EQ(d[0].candidates[0].rules, std::vector<std::string>{"sox"});
  EXPECT_DOUBLE_EQ(d[0].candidates[0].confidence, 0.0);
  EXPECT_EQ(d[0].greedy, "docs") << "the greedy pick is a loaded expert";
}

TEST(RouterTest, LoadBiasChangesSelectionButNotScores) {
  Router r(RouterOptions{0, 1.0, 1}, RuleSet(), MakeManifestPriorScorer());
  std::vector<ExpertSlot> idle = {Slot(r.hasher(), "a", {"login bug"}),
                                  Slot(r.hasher(), "b", {"login"})};
  std::vector<ExpertSlot> busy = idle;
  busy[0].load = 1.0;
  std::vector<Decision> d1, d2;
  ASSERT_TRUE(r.Route({{"login bug", {}}}, idle, true, 0, &d1).ok());
  ASSERT_TRUE(r.Route({{"login bug", {}}}, busy, true, 0, &d2).ok());
  EXPECT_EQ(d1[0].chosen, "a");
  EXPECT_EQ(d2[0].chosen, "b");  // the busy expert is passed over
  EXPECT_DOUBLE_EQ(d1[0].Find("a")->score, d2[0].Find("a")->score);
  EXPECT_DOUBLE_EQ(d1[0].Find("a")->confidence, d2[0].Find("a")->confidence);
  EXPECT_DOUBLE_EQ(d2[0].Find("a")->load_bias, -1.0);
  // No load, no bias: 0, never the -0 that the audit would print as "-0.000".
  EXPECT_FALSE(std::signbit(d1[0].Find("a")->load_bias));
  EXPECT_FALSE(std::signbit(d1[0].Find("a")->health_bias));
  EXPECT_DOUBLE_EQ(d2[0].propensity, 1.0);  // what actually happened, not what scores said
}

TEST(RouterTest, HealthBiasPassesOverACrashingExpertWithoutTouchingItsScore) {
  Router r(RouterOptions{0, 0, 1, 0.5}, RuleSet(), MakeManifestPriorScorer());
  std::vector<ExpertSlot> ex = {Slot(r.hasher(), "a", {"login bug"}),
                                Slot(r.hasher(), "b", {"login"})};
  std::vector<Decision> healthy, sick;
  ASSERT_TRUE(r.Route({{"login bug", {}}}, ex, true, 0, &healthy).ok());
  ex[0].health = 1.0;  // restarting after a crash
  ASSERT_TRUE(r.Route({{"login bug", {}}}, ex, true, 0, &sick).ok());
  EXPECT_EQ(healthy[0].chosen, "a");
  EXPECT_EQ(sick[0].chosen, "b");
  EXPECT_EQ(sick[0].candidates.back().expert, "a") << "still in the fallback chain, last";
  EXPECT_DOUBLE_EQ(sick[0].Find("a")->health_bias, -0.5);
  EXPECT_DOUBLE_EQ(sick[0].Find("a")->score, healthy[0].Find("a")->score);
  EXPECT_DOUBLE_EQ(sick[0].Find("a")->confidence, healthy[0].Find("a")->confidence);
}

TEST(RouterTest, ExplorationRateAndPropensitiesAreConsistent) {
  const double eps = 0.3;
  Router r(RouterOptions{eps, 0.2, 42}, RuleSet(), MakeManifestPriorScorer());
  std::vector<ExpertSlot> ex = {Slot(r.hasher(), "a", {"login"}), Slot(r.hasher(), "b", {"x"}),
                                Slot(r.hasher(), "c", {"y"}), Slot(r.hasher(), "d", {"z"})};
  std::map<std::string, int> counts;
  std::map<std::string, double> propensity;  // what the router recorded for each choice
  int explored = 0;
  double confidence = -1;  // of the greedy pick: the rate of exploration follows the doubt
  const int n = 20000;
  for (int i = 0; i < n; ++i) {
    std::vector<Decision> d;
    ASSERT_TRUE(r.Route({{"login", {}}}, ex, true, 0, &d).ok());
    ++counts[d[0].chosen];
    explored += d[0].explored;
    auto [it, fresh] = propensity.emplace(d[0].chosen, d[0].propensity);
    ASSERT_DOUBLE_EQ(it->second, d[0].propensity);      // same scores, same propensity
    ASSERT_EQ(d[0].candidates[0].expert, d[0].chosen);  // the chosen one is tried first
    ASSERT_EQ(d[0].greedy, "a");
    confidence = d[0].Find("a")->confidence;
  }
  const double rate = std::min(1.0, eps * std::clamp(2 * (1 - confidence), 0.1, 2.0));
  EXPECT_NEAR(explored / double(n), rate, 0.02);
  ASSERT_EQ(propensity.size(), 4u);  // every expert can be explored
  double total = 0;
  for (const auto& [e, p] : propensity) {
    total += p;
    EXPECT_NEAR(counts[e] / double(n), p, 0.01) << e;  // logged propensities are the truth
    EXPECT_GE(p, rate * 0.1 / 4) << e;                 // the uniform floor
  }
  EXPECT_NEAR(total, 1.0, 1e-9);
  EXPECT_GT(propensity["a"], 1 - rate);
  // A dry run never explores.
  std::vector<Decision> d;
  ASSERT_TRUE(r.Route({{"login", {}}}, ex, false, 0, &d).ok());
  EXPECT_FALSE(d[0].explored);
  EXPECT_EQ(d[0].chosen, "a");
}

TEST(RouterTest, NoExpertsIsUnavailable) {
  Router r(RouterOptions{}, RuleSet(), MakeManifestPriorScorer());
  std::vector<Decision> d;
  EXPECT_EQ(r.Route({{"x", {}}}, {}, true, 0, &d).code(), Status::Code::kUnavailable);
}

// The exploration policy against hand-computed answers (python, the same formula):
// eps = rate * clamp(2 (1 - confidence), 0.1, 2); spread = 0.1 / E + 0.9 softmax(s / 0.1).
TEST(ExploreTest, ProbabilitiesMatchHandComputedAnswers) {
  ExploreOptions o;
  o.rate = 0.05;
  Exploration e = Explore({1.0, 0.0}, 0.5, o);
  EXPECT_DOUBLE_EQ(e.epsilon, 0.05);
  EXPECT_NEAR(e.spread[0], 0.9499591419181679, 1e-15);
  EXPECT_NEAR(e.spread[1], 0.050040858081832194, 1e-15);
  EXPECT_NEAR(e.Probability(0), 0.9974979570959084, 1e-15);
  EXPECT_NEAR(e.Probability(1), 0.00250204290409161, 1e-15);
  e = Explore({0.9, 0.8, 0.1}, 0.9, o);  // sure: a fifth of the rate
  EXPECT_NEAR(e.epsilon, 0.01, 1e-15);
  EXPECT_NEAR(e.Probability(0), 0.9969112473547405, 1e-15);
  EXPECT_NEAR(e.Probability(1), 0.0027532126676024058, 1e-15);
  EXPECT_NEAR(e.Probability(2), 0.00033553997765707133, 1e-15);
  // The bounds of the doubt: a tenth of the rate at certainty, twice it at none, never
  // above 1; no exploration at rate 0.
  EXPECT_NEAR(Explore({1, 0}, 1.0, o).epsilon, 0.005, 1e-15);
  EXPECT_NEAR(Explore({1, 0}, 0.0, o).epsilon, 0.1, 1e-15);
  o.rate = 0.8;
  EXPECT_EQ(Explore({1, 0}, 0.0, o).epsilon, 1.0);
  o.rate = 0;
  EXPECT_EQ(Explore({1, 0}, 0.0, o).Probability(0), 1.0);
  // Every candidate's chance, and they sum to one.
  o.rate = 0.05;
  e = Explore({3, 2, 1, 0, -5}, 0.3, o);
  double sum = 0;
  for (size_t j = 0; j < 5; ++j) {
    EXPECT_GT(e.Probability(j), 0);
    sum += e.Probability(j);
  }
  EXPECT_NEAR(sum, 1.0, 1e-12);
}

// The sampler draws each candidate as often as its probability says (within 5 standard
// errors over 200,000 draws), and draws nothing when there is nothing to explore.
TEST(ExploreTest, TheSamplerDrawsAsTheProbabilitiesSay) {
  ExploreOptions o;
  o.rate = 0.3;
  const Exploration e = Explore({0.5, 0.45, 0.0}, 0.2, o);
  std::mt19937_64 rng(7);
  const int n = 200000;
  std::vector<int> count(3, 0);
  int explored = 0;
  for (int i = 0; i < n; ++i) {
    bool x;
    ++count[Sample(e, &rng, &x)];
    explored += x;
  }
  for (size_t j = 0; j < 3; ++j) {
    const double p = e.Probability(j);
    EXPECT_NEAR(count[j] / double(n), p, 5 * std::sqrt(p * (1 - p) / n)) << j;
  }
  EXPECT_NEAR(explored / double(n), e.epsilon, 5 * std::sqrt(e.epsilon / n));
  o.rate = 0;
  std::mt19937_64 a(3), b(3);
  bool x;
  EXPECT_EQ(Sample(Explore({1, 0}, 0.5, o), &a, &x), 0u);
  EXPECT_FALSE(x);
  EXPECT_EQ(a(), b());  // no draw
}

// Estimators against hand-computed answers, and the doubly robust estimate's defining
// property: unbiased with a wrong reward model when the propensities are right.
TEST(EstimatorsTest, MeanCiAndDoublyRobustMatchKnownAnswers) {
  PolicyEstimate m = MeanCi({1, 0, 1, 0});
  EXPECT_DOUBLE_EQ(m.value, 0.5);
  EXPECT_NEAR(m.ci, 0.5658032638058332, 1e-15);  // 1.96 sqrt(1/3) / 2
  EXPECT_EQ(MeanCi({0.7}).ci, 0);
  EXPECT_EQ(MeanCi({}).value, 0);
  EXPECT_DOUBLE_EQ(DoublyRobust(0.3, true, 1, 0.3, 0.5), 1.7);
  EXPECT_DOUBLE_EQ(DoublyRobust(0.6, false, 1, 0.3, 0.5), 0.6);
  // Two actions; the logger picks action 1 with probability 0.2. The target policy always
  // picks action 1, whose true mean reward is 0.7; the reward model says 0.1 for it.
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<double> u(0, 1);
  std::vector<double> dr;
  for (int i = 0; i < 400000; ++i) {
    const bool logged1 = u(rng) < 0.2;
    const double reward = u(rng) < (logged1 ? 0.7 : 0.4) ? 1.0 : 0.0;
    const double q_logged = logged1 ? 0.1 : 0.9;  // wrong for both actions
    dr.push_back(DoublyRobust(0.1, logged1, reward, q_logged, logged1 ? 0.2 : 0.8));
  }
  const PolicyEstimate e = MeanCi(dr);
  EXPECT_NEAR(e.value, 0.7, 3 * e.ci / 1.96) << "ci " << e.ci;
  EXPECT_GT(std::fabs(0.1 - 0.7), 10 * e.ci);  // the model alone is far off
}

TEST(EstimatorsTest, LoggedPickValueMatchesKnownAnswers) {
  // The logged action: doubly robust around the reference, the weight 1/0.5 = 2 unclipped...
  EXPECT_DOUBLE_EQ(LoggedPickValue(0.3, true, 1, 0.5, 10), 0.3 + 2 * 0.7);
  // ... or clipped at 1.5.
  EXPECT_DOUBLE_EQ(LoggedPickValue(0.3, true, 1, 0.5, 1.5), 0.3 + 1.5 * 0.7);
  // Another pick: the reference alone, whatever the logged reward.
  EXPECT_DOUBLE_EQ(LoggedPickValue(0.3, false, 1, 0.5, 2), 0.3);
  // A clip of 1 is the observed reward itself.
  EXPECT_DOUBLE_EQ(LoggedPickValue(0.3, true, 0, 0.9, 1), 0);
  // Unbiased where the reference is wrong: three actions, the logger picks action 0 with
  // probability 0.6 (weight 1/0.6 under the clip of 2); its true mean reward is 0.7, the
  // reference says 0.2. The policy that always picks action 0 is worth 0.7.
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> u(0, 1);
  std::vector<double> v;
  for (int i = 0; i < 400000; ++i) {
    const bool logged0 = u(rng) < 0.6;
    const double reward = logged0 ? (u(rng) < 0.7 ? 1.0 : 0.0) : 0.0;
    v.push_back(LoggedPickValue(0.2, logged0, reward, 0.6, 2));
  }
  const PolicyEstimate e = MeanCi(v);
  EXPECT_NEAR(e.value, 0.7, 3 * e.ci / 1.96) << "ci " << e.ci;
}

LoggedOutcome Decided(const std::string& task, const std::string& logged, const std::string& greedy,
                      double reward, double propensity) {
  LoggedOutcome o;
  o.task_id = task;
  o.expert = logged;
  o.greedy = greedy;
  o.reward = reward;
  o.propensity = propensity;
  o.candidates = {{"a", 0, 0.6, 0}, {"b", 0.25, 0.2, 0}, {"c", 0, 0.1, 0}};
  return o;
}

TEST(GateTest, SplitHoldsOutTheNewestAndTrainsOnAWindowBeforeThem) {
  RetrainSplit s = SplitOutcomes(1000, 0.2, 2000, 50000);
  EXPECT_EQ(s.begin, 0u);
  EXPECT_EQ(s.split, 800u);
  EXPECT_EQ(s.end, 1000u);
  s = SplitOutcomes(1000, 0.2, 150, 300);  // at most 150 held out, 300 trained on
  EXPECT_EQ(s.split, 850u);
  EXPECT_EQ(s.begin, 550u);
}

TEST(GateTest, HeldOutDecisionsAreTheRoutersFirstAttemptsAndGreedyPicksFollowRules) {
  std::vector<LoggedOutcome> h;
  h.push_back(Decided("t0", "a", "a", 0, 0.9));  // before the split
  h.push_back(Decided("t1", "a", "a", 0, 0.9));
  LoggedOutcome fb = h.back();
  fb.attempt = 2, fb.expert = "b", fb.reward = 1, fb.propensity = 1;  // a fallback
  h.push_back(fb);
  LoggedOutcome forced = Decided("t2", "c", "a", 1, 1);
  forced.forced = true;  // policy, not the router's decision
  h.push_back(forced);
  LoggedOutcome verdict = h[1];
  verdict.feedback = true;
  h.push_back(verdict);
  h.push_back(Decided("t3", "b", "a", 1, 0.02));
  EXPECT_EQ(HeldOutDecisions(h, 1), (std::vector<size_t>{1, 5}));
  // Model scores plus rule scores: b's rule (0.25) makes 0.15 + 0.25 beat a's 0.2.
  EXPECT_EQ(GreedyPick(h[1].candidates, {0.2f, 0.15f, 0.0f}), 1u);
  EXPECT_EQ(GreedyPick(h[1].candidates, {0.5f, 0.15f, 0.0f}), 0u);
  EXPECT_EQ(GreedyPick(h[1].candidates, {0.0f, 0.25f, 0.5f}), 1u) << "a tie goes to the name";
}

TEST(GateTest, TheEstimatePairsThePicksOnWhatTheLogObserved) {
  std::vector<LoggedOutcome> h;
  h.push_back(Decided("t1", "a", "a", 1, 0.9));  // both pick a
  h.push_back(Decided("t2", "a", "a", 0, 0.9));  // a failed; the candidate picks b
  LoggedOutcome fb = h.back();
  fb.attempt = 2, fb.expert = "b", fb.reward = 1, fb.propensity = 1;  // not used
  h.push_back(fb);
  h.push_back(Decided("t3", "b", "a", 1, 0.05));  // explored b, which succeeded
  h.push_back(Decided("t4", "a", "a", 1, 0.9));   // the candidate's c was never tried
  const std::vector<size_t> d = HeldOutDecisions(h, 0);
  ASSERT_EQ(d.size(), 4u);
  const GateEstimate e = EstimateAgainstLogged(h, d, {"a", "b", "b", "c"}, 2);
  // Per decision, candidate and live (the logged greedy a), the reference's scores being
  // a 0.6, b 0.2, c 0.1:
  const double a_ok = 0.6 + 0.4 / 0.9, a_failed = 0.6 - 0.6 / 0.9;
  const std::vector<double> cand = {a_ok, 0.2, 0.2 + 2 * 0.8, 0.1};
  const std::vector<double> live = {a_ok, a_failed, 0.6, a_ok};
  std::vector<double> diff;
  for (size_t k = 0; k < 4; ++k) diff.push_back(cand[k] - live[k]);
  EXPECT_DOUBLE_EQ(e.candidate.value, MeanCi(cand).value);
  EXPECT_DOUBLE_EQ(e.live.value, MeanCi(live).value);
  EXPECT_DOUBLE_EQ(e.diff.value, MeanCi(diff).value);
  EXPECT_DOUBLE_EQ(e.diff.ci, MeanCi(diff).ci);
  EXPECT_DOUBLE_EQ(e.agreement, 0.25);
}

TEST(GateTest, PromotesOnlyABetterCandidateOnEnoughDecisionsOrAStaleLiveVersion) {
  GateInputs in;
  in.decisions = 19;
  in.diff = 0.5;
  GateVerdict v = DecidePromotion(in);
  EXPECT_FALSE(v.promoted);
  EXPECT_NE(v.reason.find("too few held-out decisions"), std::string::npos) << v.reason;
  in.decisions = 20;
  EXPECT_TRUE(DecidePromotion(in).promoted);
  in.diff = 0;
  v = DecidePromotion(in);
  EXPECT_FALSE(v.promoted);
  EXPECT_NE(v.reason.find("no better"), std::string::npos) << v.reason;
  in.diff = -0.01;
  v = DecidePromotion(in);
  EXPECT_FALSE(v.promoted);
  EXPECT_NE(v.reason.find("worse"), std::string::npos) << v.reason;
  // The live version's cutoff lies before a whole window: promoted all the same ...
  in.full_window = true;
  in.live_cutoff = 100;
  in.first_seq = 500;
  v = DecidePromotion(in);
  EXPECT_TRUE(v.promoted);
  EXPECT_NE(v.reason.find("older than this retrain's outcomes"), std::string::npos) << v.reason;
  // ... unless a start replays nothing (no online updates), or the window starts right
  // after the cutoff.
  in.online_updates = false;
  EXPECT_FALSE(DecidePromotion(in).promoted);
  in.online_updates = true;
  in.first_seq = 101;
  EXPECT_FALSE(DecidePromotion(in).promoted);
}

// Population training's parts: the variants in order, their options, the choice.
TEST(PopulationTest, VariantsOptionsAndChoice) {
  std::vector<Variant> v = PopulationVariants(4);
  ASSERT_EQ(v.size(), 4u);
  EXPECT_EQ(v[0].name, "fresh");
  EXPECT_FALSE(v[0].warm);
  EXPECT_TRUE(v[1].warm);
  EXPECT_EQ(PopulationVariants(1).size(), 1u);
  EXPECT_EQ(PopulationVariants(0).size(), 1u);  // at least the trainer as configured
  EXPECT_EQ(PopulationVariants(9).size(), 4u);
  TrainOptions base;
  base.lr = 0.2f;
  base.lr_wide = 8;
  const TrainOptions half = VariantOptions(base, v[2]);
  EXPECT_FLOAT_EQ(half.lr, 0.1f);
  EXPECT_FLOAT_EQ(half.lr_wide, 4);
  EXPECT_EQ(half.epochs, base.epochs);
  EXPECT_FLOAT_EQ(VariantOptions(base, v[3]).lr_wide, 16);
  // The lowest loss among the eligible, the first of equals; none eligible: the first.
  EXPECT_EQ(ChooseVariant({{true, 0.5}, {false, 0.1}, {true, 0.4}, {true, 0.4}}), 2u);
  EXPECT_EQ(ChooseVariant({{false, 0}, {true, 0.7}}), 1u);
  EXPECT_EQ(ChooseVariant({{false, 0}, {false, 0}}), 0u);
  EXPECT_EQ(ChooseVariant({}), 0u);
}

}  // namespace
}  // namespace cortex
