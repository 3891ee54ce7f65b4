// The gating model: serialization, CPU training behaviour, the learner's validated
// promotion, and the CUDA engine against the CPU reference (skipped without a GPU).
#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <random>

#include "cortex/checkpointer.h"
#include "cortex/learner.h"
#include "cortex/population.h"
#include "cortex/router.h"

namespace cortex {
namespace {

const char* kWords[] = {"fix",     "login", "bug",    "docs",  "readme", "typo",  "faster",
                        "cache",   "slow",  "add",    "new",   "option", "test",  "flaky",
                        "release", "build", "deploy", "token", "parser", "render"};

// Three experts; each succeeds on tasks containing its own word ("bug", "docs", "faster").
struct World {
  std::vector<std::string> experts = {"bugfix", "docs", "perf"};
  std::vector<std::string> marks = {"bug", "docs", "faster"};
  std::mt19937 rng{5};
  std::string Text(int* label) {
    *label = static_cast<int>(rng() % 3);
    std::string s = marks[*label];
    for (int i = 0; i < 5; ++i) s += std::string(" ") + kWords[rng() % 20];
    return s;
  }
};

GatingShape SmallShape() {
  GatingShape s;
  s.bits = 14;
  s.hidden = 16;
  s.wide_bits = 16;
  return s;
}

// Logged bandit data: a uniformly random expert per task, reward 1 when it was the right one.
std::vector<LoggedOutcome> Logged(World* w, int n) {
  std::vector<LoggedOutcome> out;
  for (int i = 0; i < n; ++i) {
    int label;
    LoggedOutcome o;
    o.seq = i + 1;
    o.text = w->Text(&label);
    const int chosen = static_cast<int>(w->rng() % 3);
    o.expert = w->experts[chosen];
    o.reward = chosen == label;
    o.propensity = 1.0 / 3;
    for (const auto& e : w->experts) o.candidates.emplace_back(e, 0.0);
    o.greedy = w->experts[0];  // the logging policy always "preferred" bugfix
    out.push_back(o);
  }
  return out;
}

// 3000 logged outcomes as a training set, in the small shape.
TrainSet BanditSet(World* w, LearnerOptions* lo) {
  std::vector<LoggedOutcome> logged = Logged(w, 3000);
  lo->shape = SmallShape();
  Learner learner(*lo, FeatureHasher(lo->shape.bits), MakeCpuEngine(), MakeCpuEngine());
  return learner.MakeTrainSet(logged, 0, logged.size());
}

double GreedyAccuracy(GatingEngine* engine, const GatingModel& m, World* w, int n) {
  FeatureHasher h(m.shape().bits);
  SparseBatch x;
  std::vector<int> labels;
  for (int i = 0; i < n; ++i) {
    int label;
    x.Add(h.Task(w->Text(&label), {}), static_cast<uint32_t>(m.rows() - 1));
    labels.push_back(label);
  }
  std::vector<float> prior(static_cast<size_t>(n) * 3, 0.0f), out;
  EXPECT_TRUE(engine->Score(m, x, w->experts, prior, &out).ok());
  int ok = 0;
  for (int i = 0; i < n; ++i) {
    int best = 0;
    for (int e = 1; e < 3; ++e)
      if (out[i * 3 + e] > out[i * 3 + best]) best = e;
    ok += best == labels[i];
  }
  return static_cast<double>(ok) / n;
}

TEST(GatingTest, SerializationRoundTripsAndRejectsGarbage) {
  GatingModel m(SmallShape());
  m.emb[17] = 3.5f;
  m.wide[123] = -1.25f;
  m.MutableHead("docs")->w[2] = 0.75f;
  m.prior_w = 4.0f;
  m.g_emb[17] = 9.0f;  // optimiser state travels too, so a reloaded model learns on as before
  m.g_wide[123] = 2.0f;
  m.g_heads["docs"][2] = 5.0f;
  std::string blob = m.Serialize();
  EXPECT_LT(blob.size(), 4096u);  // untouched rows are regenerated from the seed, not stored
  auto back = GatingModel::Deserialize(blob);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->emb, m.emb);
  EXPECT_EQ(back->wide, m.wide);
  EXPECT_EQ(back->Head("docs")->w, m.Head("docs")->w);
  EXPECT_EQ(back->g_emb, m.g_emb);
  EXPECT_EQ(back->g_wide, m.g_wide);
  EXPECT_EQ(back->g_heads.at("docs"), m.g_heads.at("docs"));
  EXPECT_FLOAT_EQ(back->prior_w, 4.0f);
  EXPECT_EQ(back->TouchedRows(), 1u);
  EXPECT_FALSE(GatingModel::Deserialize("nonsense").ok());
  EXPECT_FALSE(GatingModel::Deserialize(blob.substr(0, blob.size() - 3)).ok());
  EXPECT_FALSE(GatingModel::Deserialize(blob + "x").ok());
}

TEST(GatingTest, UnseenExpertIsScoredByTheCalibratedPrior) {
  GatingModel m(SmallShape());
  auto cpu = MakeCpuEngine();
  SparseBatch x;
  FeatureHasher h(SmallShape().bits);
  x.Add(h.Task("fix typo in readme", {}), static_cast<uint32_t>(m.rows() - 1));
  std::vector<float> out;
  ASSERT_TRUE(cpu->Score(m, x, {"docs", "perf"}, {0.6f, 0.0f}, &out).ok());
  EXPECT_GT(out[0], out[1]);  // no head, no wide weights: the manifest match decides
  EXPECT_NEAR(out[1], 1 / (1 + std::exp(-m.prior_b)), 1e-5);
}

TEST(GatingTest, CpuTrainingLearnsFromBanditFeedbackDeterministically) {
  World w;
  LearnerOptions lo;
  TrainSet set = BanditSet(&w, &lo);
  EXPECT_EQ(set.rows.size(), 3000u);
  EXPECT_FLOAT_EQ(set.rows[0].weight, 2.0f);  // 1/propensity = 3, clipped at ips_clip 2
  auto cpu = MakeCpuEngine();
  GatingModel a(lo.shape), b(lo.shape);
  ASSERT_TRUE(cpu->Train(&a, set, lo.train).ok());
  ASSERT_TRUE(cpu->Train(&b, set, lo.train).ok());
  EXPECT_EQ(a.emb, b.emb);  // same seed, same data: the same model, bit for bit
  EXPECT_EQ(a.wide, b.wide);
  World test;
  test.rng.seed(99);
  EXPECT_GT(GreedyAccuracy(cpu.get(), a, &test, 600), 0.9);
  GatingModel untrained(lo.shape);
  test.rng.seed(99);
  EXPECT_LT(GreedyAccuracy(cpu.get(), untrained, &test, 600), 0.6);
}

TEST(GatingTest, EpochsRunOneCallAtATimeAreThoseOfOneCall) {
  World w;
  LearnerOptions lo;
  TrainSet set = BanditSet(&w, &lo);
  auto cpu = MakeCpuEngine();
  TrainOptions three = lo.train;
  three.epochs = 3;
  three.shuffle = true;  // the epoch number seeds the order: each call must say which
  GatingModel a(lo.shape), b(lo.shape);
  ASSERT_TRUE(cpu->Train(&a, set, three).ok());
  for (int e = 0; e < 3; ++e) {
    TrainOptions one = three;
    one.epochs = 1;
    one.first_epoch = e;
    ASSERT_TRUE(cpu->Train(&b, set, one).ok());
  }
  EXPECT_EQ(a.emb, b.emb);
  EXPECT_EQ(a.wide, b.wide);
  EXPECT_EQ(a.Head("docs")->w, b.Head("docs")->w);
}

// The newest rows of the set (the validation slice) say the opposite of the rest: every
// pass on the rest makes the model surer of what the slice contradicts, so the first pass
// is the best Fit can do; told the truth, the slice keeps improving to the last pass. Either
// way the model kept is a fresh one trained that many passes on every row.
TEST(GatingTest, FitStopsAtTheEpochTheNewestRowsScoreBestOn) {
  LearnerOptions lo;
  lo.train.epochs = 4;
  lo.validation_fraction = 0.1;
  World w;
  TrainSet truthful = BanditSet(&w, &lo);
  Learner learner(lo, FeatureHasher(lo.shape.bits), MakeCpuEngine(), MakeCpuEngine());
  auto cpu = MakeCpuEngine();
  auto fit_and_check = [&](const TrainSet& set, int want) {
    FitReport rep;
    GatingModel m(lo.shape);
    ASSERT_TRUE(learner.Fit(&m, set, &rep).ok());
    EXPECT_EQ(rep.epochs, want);
    EXPECT_EQ(rep.validation_rows, 300);
    // Scored after each pass until one did not improve (or the last), best at `epochs`.
    ASSERT_EQ(rep.validation_loss.size(), static_cast<size_t>(std::min(lo.train.epochs, want + 1)));
    for (int e = 1; e < want; ++e)
      EXPECT_LT(rep.validation_loss[e], rep.validation_loss[e - 1]) << "pass " << e + 1;
    if (want < lo.train.epochs) {
      EXPECT_GE(rep.validation_loss[want], rep.validation_loss[want - 1]);
    }
    TrainOptions all = lo.train;
    all.epochs = want;
    GatingModel direct(lo.shape);
    ASSERT_TRUE(cpu->Train(&direct, set, all).ok());
    EXPECT_EQ(m.emb, direct.emb);
    EXPECT_EQ(m.wide, direct.wide);
    EXPECT_EQ(m.g_emb, direct.g_emb);
    EXPECT_EQ(m.g_wide, direct.g_wide);
    // Everything else too, Adagrad state included: what the passes on the older rows
    // changed was all put back before the passes on every row.
    EXPECT_TRUE(m.Serialize() == direct.Serialize());
  };
  fit_and_check(truthful, 4);
  TrainSet contradicted = truthful;
  for (size_t i = 2700; i < contradicted.rows.size(); ++i)
    contradicted.rows[i].reward = 1 - contradicted.rows[i].reward;
  fit_and_check(contradicted, 1);

  // Too small a slice to judge by (or none asked for): every pass, as Train makes them.
  lo.validation_fraction = 0;
  Learner plain(lo, FeatureHasher(lo.shape.bits), MakeCpuEngine(), MakeCpuEngine());
  FitReport rep;
  GatingModel m(lo.shape), direct(lo.shape);
  ASSERT_TRUE(plain.Fit(&m, contradicted, &rep).ok());
  ASSERT_TRUE(cpu->Train(&direct, contradicted, lo.train).ok());
  EXPECT_EQ(rep.epochs, 4);
  EXPECT_EQ(rep.validation_rows, 0);
  EXPECT_TRUE(m.Serialize() == direct.Serialize());
}

// The log a live system leaves: `n` tasks routed by `router` (over the learner's live
// model, exploring), each outcome learned from online as cortexd does.
std::vector<LoggedOutcome> Routed(World* w, Router* router, Learner* learner, int n, long* seq) {
  std::vector<ExpertSlot> slots;
  for (const auto& e : w->experts) slots.push_back({{e, SparseVector{}}, 0.0});
  std::vector<LoggedOutcome> out;
  for (int i = 0; i < n; ++i) {
    int label;
    LoggedOutcome o;
    o.text = w->Text(&label);
    std::vector<Decision> d;
    EXPECT_TRUE(router->Route({{o.text, {}}}, slots, true, 0, &d).ok());
    o.seq = ++*seq;
    o.task_id = "t" + std::to_string(o.seq);
    o.expert = d[0].chosen;
    o.reward = d[0].chosen == w->experts[label];
    o.propensity = d[0].propensity;
    o.greedy = d[0].greedy;
    for (const auto& c : d[0].candidates)
      o.candidates.push_back({c.expert, c.rule_score, c.model_score, c.prior});
    learner->Observe(o);
    out.push_back(o);
  }
  return out;
}

// Population training: every variant is fitted, the one with the lowest loss on the
// validation slice is kept (exactly the model Fit makes with that variant's options), and a
// warm start is judged only on a slice newer than what its weights learned from.
TEST(GatingTest, APopulationKeepsTheVariantThatScoresBestOnTheValidationSlice) {
  World w;
  LearnerOptions lo;
  lo.shape = SmallShape();
  lo.max_examples = 1600;
  lo.max_holdout = 400;
  lo.population = 4;
  Learner learner(lo, FeatureHasher(lo.shape.bits), MakeCpuEngine(), MakeCpuEngine());
  const std::vector<LoggedOutcome> logged = Logged(&w, 2000);
  auto res = learner.Retrain(logged, 1, 0);
  ASSERT_TRUE(res.ok()) << res.status().ToString();
  ASSERT_EQ(res->population.size(), 4u);
  EXPECT_FALSE(res->population[1].eligible);  // v0 is live: no saved weights to start from
  EXPECT_NE(res->population[1].why_not.find("no saved live version"), std::string::npos);
  double best = 1e9;
  size_t arg = 0;
  for (size_t k = 0; k < 4; ++k) {
    const auto& f = res->population[k];
    if (!f.eligible) continue;
    EXPECT_EQ(f.fit.validation_rows, 160);
    const double loss = f.fit.validation_loss[f.fit.epochs - 1];
    if (loss < best) best = loss, arg = k;
  }
  EXPECT_EQ(res->chosen, arg);
  // Each fitted variant is estimated against the live system too (reported); the kept
  // one's estimate is the one the gate decides on.
  for (size_t k : {0, 2, 3}) EXPECT_TRUE(res->population[k].estimated) << k;
  EXPECT_FALSE(res->population[1].estimated);
  EXPECT_EQ(res->population[arg].diff, res->diff.value);
  // The kept model is the chosen variant's Fit, bit for bit.
  LearnerOptions vo = lo;
  vo.train = VariantOptions(lo.train, PopulationVariants(4)[arg]);
  Learner alone(vo, FeatureHasher(lo.shape.bits), MakeCpuEngine(), MakeCpuEngine());
  GatingModel direct(lo.shape);
  ASSERT_TRUE(alone.Fit(&direct, alone.MakeTrainSet(logged, 0, 1600)).ok());
  EXPECT_TRUE(direct.Serialize() == res->model.Serialize());
  const std::string& metrics = res->record.metrics;
  EXPECT_NE(metrics.find("\"population\":["), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("\"kept\":\"" + res->population[arg].variant + "\""), std::string::npos)
      << metrics;

  // A warm start from weights that learned up to event 1000: the validation slice (events
  // 1441-1600) is newer, so it is judged; from weights that learned up to 1500, it is not.
  const GatingModel base = res->model;
  res = learner.Retrain(logged, 2, 0, {}, WarmStart{&base, 1000});
  ASSERT_TRUE(res.ok());
  EXPECT_TRUE(res->population[1].eligible) << res->population[1].why_not;
  res = learner.Retrain(logged, 3, 0, {}, WarmStart{&base, 1500});
  ASSERT_TRUE(res.ok());
  EXPECT_FALSE(res->population[1].eligible);
  EXPECT_NE(res->population[1].why_not.find("learned from part of the validation slice"),
            std::string::npos);
  EXPECT_NE(res->chosen, 1u);
}

TEST(GatingTest, RetrainPromotesABetterCandidateAndRefusesAWorseOne) {
  World w;
  LearnerOptions lo;
  lo.shape = SmallShape();
  lo.max_examples = 1600;  // a window of 2000 outcomes, as the daemon reads for a retrain
  lo.max_holdout = 400;
  auto learner =
      std::make_shared<Learner>(lo, FeatureHasher(lo.shape.bits), MakeCpuEngine(), MakeCpuEngine());
  // The live system logged uniformly random choices and "preferred" bugfix (right a third
  // of the time): a trained candidate is clearly better on the held-out decisions.
  std::vector<LoggedOutcome> logged = Logged(&w, 2000);
  const std::vector<LoggedOutcome> truthful = logged;
  auto res = learner->Retrain(logged, 1, 0);
  ASSERT_TRUE(res.ok()) << res.status().ToString();
  EXPECT_EQ(res->holdout_rows, 400);
  EXPECT_EQ(res->train_rows, 1600);
  EXPECT_TRUE(res->promoted) << res->reason;
  EXPECT_GT(res->diff.value - res->diff.ci, 0.2);
  // bugfix was logged a third of the time, weighted min(3, clip), right a third of those.
  EXPECT_NEAR(res->live.value, std::min(3.0, static_cast<double>(lo.ips_clip)) / 9, 0.08);
  EXPECT_EQ(res->record.trained_through, 1600);
  EXPECT_NE(res->record.metrics.find("\"promoted\":true"), std::string::npos);
  EXPECT_NE(res->record.metrics.find("the live system's greedy picks"), std::string::npos);
  std::vector<LoggedOutcome> newer(logged.begin() + 1600, logged.end());
  learner->Install(std::move(res->model), 1, res->record.trained_through, newer);

  // Now the live model routes (and learns online), and the newest outcomes are its own: a
  // window of v1's holdout and 1600 decisions since, whose training part lies about the
  // docs tasks. The candidate routes them wrong, the live system did not: refused, on the
  // held-out decisions alone (the candidate learning online through them, as it would
  // have live).
  Router router(RouterOptions{0.05, 0, 1}, RuleSet(), MakeGatingScorer(learner),
                FeatureHasher(lo.shape.bits));
  long seq = 2000;
  logged = newer;
  for (auto& o : Routed(&w, &router, learner.get(), 1600, &seq)) logged.push_back(o);
  for (size_t i = 0; i < 1600; ++i)
    if (logged[i].text.rfind("docs", 0) == 0) logged[i].reward = 1 - logged[i].reward;
  res = learner->Retrain(logged, 2, 0);
  ASSERT_TRUE(res.ok());
  EXPECT_GT(res->live.value, 0.8) << res->record.metrics;
  EXPECT_GT(res->live.value, res->candidate.value + 0.05) << res->record.metrics;
  EXPECT_LT(res->diff.value + res->diff.ci, 0) << res->record.metrics;
  EXPECT_FALSE(res->promoted);
  EXPECT_EQ(res->record.status, "refused");
  EXPECT_NE(res->reason.find("estimated worse"), std::string::npos) << res->reason;

  // The same outcomes as the newest window of a longer log: the live version's cutoff
  // (1600) is older than all of them, so a restart would replay more than a retrain reads.
  // The candidate is promoted all the same, saying why.
  for (auto& o : logged) o.seq += 5000;
  res = learner->Retrain(logged, 3, 0);
  ASSERT_TRUE(res.ok());
  EXPECT_LT(res->diff.value + res->diff.ci, 0) << res->record.metrics;
  EXPECT_TRUE(res->promoted);
  EXPECT_NE(res->reason.find("older than this retrain's outcomes"), std::string::npos)
      << res->reason;
  EXPECT_NE(res->record.metrics.find("\"live_cutoff\":1600"), std::string::npos)
      << res->record.metrics;
  // Without online updates a start replays nothing: no reason to promote a worse candidate.
  lo.online_updates = false;
  Learner offline(lo, FeatureHasher(lo.shape.bits), MakeCpuEngine(), MakeCpuEngine());
  auto good = offline.Retrain(truthful, 1, 0);
  ASSERT_TRUE(good.ok());
  ASSERT_TRUE(good->promoted) << good->reason;
  EXPECT_NE(good->record.metrics.find("static"), std::string::npos) << good->record.metrics;
  offline.Install(std::move(good->model), 1, good->record.trained_through, {});
  res = offline.Retrain(logged, 2, 0);
  ASSERT_TRUE(res.ok());
  EXPECT_LT(res->diff.value + res->diff.ci, 0) << res->record.metrics;
  EXPECT_FALSE(res->promoted) << res->reason;
}

// The gate's candidate decides each held-out task as it would have live: its picks are
// the greedy choices of the same weights made live after the training part, routing and
// learning online through the holdout as cortexd does.
TEST(GatingTest, ACandidatesPicksAreThoseItWouldHaveMadeLive) {
  World w;
  LearnerOptions lo;
  lo.shape = SmallShape();
  const std::vector<LoggedOutcome> logged = Logged(&w, 1000);
  std::map<bool, std::vector<std::string>> by_mode;
  for (bool online : {true, false}) {
    lo.online_updates = online;
    auto live = std::make_shared<Learner>(lo, FeatureHasher(lo.shape.bits), MakeCpuEngine(),
                                          MakeCpuEngine());
    TrainSet set = live->MakeTrainSet(logged, 0, 500);
    GatingModel m(lo.shape);
    lo.train.epochs = 1;  // half trained: online steps still change its mind
    ASSERT_TRUE(MakeCpuEngine()->Train(&m, set, lo.train).ok());
    const std::vector<size_t> held = HeldOutDecisions(logged, 500);
    ASSERT_EQ(held.size(), 500u);
    auto picks = live->CandidatePicks(m, 500, logged, 500, held);
    ASSERT_TRUE(picks.ok());
    live->Install(std::move(m), 1, 500, {});
    Router router(RouterOptions{0, 0, 1}, RuleSet(), MakeGatingScorer(live),
                  FeatureHasher(lo.shape.bits));
    std::vector<ExpertSlot> slots;
    for (const auto& e : w.experts) slots.push_back({{e, SparseVector{}}, 0.0});
    std::map<std::string, int> changed;
    for (size_t k = 0; k < held.size(); ++k) {
      std::vector<Decision> d;
      ASSERT_TRUE(router.Route({{logged[500 + k].text, {}}}, slots, false, 0, &d).ok());
      ASSERT_EQ((*picks)[k], d[0].chosen) << "decision " << k << (online ? " online" : "");
      live->Observe(logged[500 + k]);
      ++changed[d[0].chosen];
    }
    EXPECT_GT(changed.size(), 1u);  // not a constant policy
    by_mode[online] = *picks;
  }
  // Learning online through the holdout changes some picks: the static weights alone
  // would not be what the candidate did live.
  EXPECT_NE(by_mode[true], by_mode[false]);
}

TEST(GatingTest, OnlineStepsMoveTheLiveModelAndRecordTheVersion) {
  LearnerOptions lo;
  lo.shape = SmallShape();
  auto learner =
      std::make_shared<Learner>(lo, FeatureHasher(lo.shape.bits), MakeCpuEngine(), MakeCpuEngine());
  Router router(RouterOptions{0, 0, 1}, RuleSet(), MakeGatingScorer(learner),
                FeatureHasher(lo.shape.bits));
  FeatureHasher h(lo.shape.bits);
  std::vector<ExpertSlot> ex = {{{"a", h.Manifest({"a", "", {"login"}, {}})}, 0},
                                {{"b", h.Manifest({"b", "", {"render"}, {}})}, 0}};
  std::vector<Decision> d;
  ASSERT_TRUE(router.Route({{"login page", {}}}, ex, true, 0, &d).ok());
  EXPECT_EQ(d[0].chosen, "a");
  EXPECT_EQ(d[0].model_version, "v0");
  // "a" keeps failing on login tasks while "b" succeeds: the live model turns around.
  for (int i = 0; i < 60; ++i) {
    LoggedOutcome o;
    o.seq = i + 1;
    o.text = "login page";
    o.expert = i % 2 ? "a" : "b";
    o.reward = i % 2 ? 0 : 1;
    o.propensity = 0.5;
    learner->Observe(o);
  }
  EXPECT_EQ(learner->trained_through(), 60);
  ASSERT_TRUE(router.Route({{"login page", {}}}, ex, true, 0, &d).ok());
  EXPECT_EQ(d[0].chosen, "b");
  EXPECT_GT(d[0].Find("b")->confidence, 0.7);
  EXPECT_LT(d[0].Find("a")->confidence, 0.3);
  learner->Install(GatingModel(lo.shape), 7, 60, {});
  ASSERT_TRUE(router.Route({{"login page", {}}}, ex, true, 0, &d).ok());
  EXPECT_EQ(d[0].model_version, "v7");
}

// A learner with a small model, live as activation 1 from step 0.
struct SmallLiveLearner {
  LearnerOptions lo = [] {
    LearnerOptions o;
    o.shape = SmallShape();
    return o;
  }();
  Learner learner{lo, FeatureHasher(lo.shape.bits), MakeCpuEngine(), MakeCpuEngine()};
  SmallLiveLearner() { learner.Install(GatingModel(lo.shape), Activation{1, 0, 0, 0, "initial"}); }
};

// A checkpoint after an activation's first holds only what steps touched since the one
// before (a delta): the whole one with the delta applied is the live weights, bit for bit.
TEST(GatingTest, ADeltaCheckpointOnItsBaseGivesTheLiveWeightsBitForBit) {
  World w;
  std::vector<LoggedOutcome> logged = Logged(&w, 300);
  SmallLiveLearner small;
  Learner& learner = small.learner;
  for (size_t i = 0; i < 100; ++i) learner.Observe(logged[i]);
  Checkpoint whole = learner.MakeCheckpoint(1, -1);
  EXPECT_EQ(whole.step, 100);
  for (size_t i = 100; i < 300; ++i) learner.Observe(logged[i]);
  Checkpoint delta = learner.MakeCheckpoint(1, whole.step);
  EXPECT_TRUE(learner.MakeCheckpoint(2, -1).weights.empty());  // not the live activation
  int64_t base = -1;
  ASSERT_FALSE(GatingModel::DeltaBase(whole.weights, &base));
  ASSERT_TRUE(GatingModel::DeltaBase(delta.weights, &base));
  EXPECT_EQ(base, 100);
  EXPECT_LT(delta.weights.size(), whole.weights.size() * 2);
  auto m = GatingModel::Deserialize(whole.weights);
  ASSERT_TRUE(m.ok());
  ASSERT_TRUE(m->ApplyDelta(delta.weights).ok());
  const GatingModel live = learner.Snapshot();
  EXPECT_EQ(m->Serialize(), live.Serialize());
  EXPECT_EQ(std::memcmp(m->g_emb.data(), live.g_emb.data(), live.g_emb.size() * 4), 0);
  EXPECT_EQ(std::memcmp(m->g_wide.data(), live.g_wide.data(), live.g_wide.size() * 4), 0);
  // A delta is no whole model, and a whole one is no delta.
  EXPECT_FALSE(GatingModel::Deserialize(delta.weights).ok());
  EXPECT_FALSE(m->ApplyDelta(whole.weights).ok());
}

// The checkpoint policy: on the `every` grid however the steps came, whole first and
// after kDeltasPerWhole deltas, each delta on the last whole one (a rebuild reads two),
// and after a failed save of a whole one, whole again.
TEST(GatingTest, CheckpointsFallOnTheGridAndEachDeltaIsOnTheLastWholeOne) {
  World w;
  std::vector<LoggedOutcome> logged = Logged(&w, 430);
  SmallLiveLearner small;
  const LearnerOptions& lo = small.lo;
  Learner& learner = small.learner;
  Checkpointer cp(10);
  std::map<long, std::string> saved;  // step -> weights
  std::vector<long> wholes;
  for (size_t i = 0; i < 400; ++i) {
    learner.Observe(logged[i]);
    auto c = cp.Take(learner);
    if (!c) continue;
    EXPECT_EQ(c->step % 10, 0) << c->step;
    int64_t base = -1;
    if (GatingModel::DeltaBase(c->weights, &base)) {
      ASSERT_FALSE(wholes.empty());
      EXPECT_EQ(base, wholes.back()) << "at step " << c->step;
      // Its whole one and it give the live weights bit for bit.
      auto m = GatingModel::Deserialize(saved[base]);
      ASSERT_TRUE(m.ok());
      ASSERT_TRUE(m->ApplyDelta(c->weights).ok());
      EXPECT_EQ(m->Serialize(), learner.Snapshot().Serialize()) << "at step " << c->step;
    } else {
      wholes.push_back(c->step);
    }
    // The save of the whole one at 90 fails: the next (100) is whole.
    const bool ok = c->step != 90;
    if (ok) saved[c->step] = c->weights;
    cp.Saved(*c, ok);
  }
  EXPECT_EQ(wholes, (std::vector<long>{10, 90, 100, 180, 260, 340}));
  // Rebuilt from a delta, the next one must be whole; from a whole one, a delta on it.
  int64_t base = -1;
  cp.Restored(1, 400, 2);
  for (size_t i = 400; i < 410; ++i) learner.Observe(logged[i]);
  auto c = cp.Take(learner);
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->step, 410);
  EXPECT_FALSE(GatingModel::DeltaBase(c->weights, &base));
  cp.Saved(*c, true);
  cp.Restored(1, 410, 0);
  for (size_t i = 410; i < 420; ++i) learner.Observe(logged[i]);
  c = cp.Take(learner);
  ASSERT_TRUE(c.has_value());
  EXPECT_TRUE(GatingModel::DeltaBase(c->weights, &base));
  EXPECT_EQ(base, 410);
  // One now (a clean stop), off the grid: the grid stays where it was.
  cp.Saved(*c, true);
  for (size_t i = 420; i < 423; ++i) learner.Observe(logged[i]);
  EXPECT_FALSE(cp.Take(learner).has_value());
  c = cp.Take(learner, /*now=*/true);
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->step, 423);
  cp.Saved(*c, true);
  EXPECT_FALSE(cp.Take(learner, /*now=*/true).has_value());  // nothing new since
  for (size_t i = 423; i < 427; ++i) learner.Observe(logged[i]);
  EXPECT_FALSE(cp.Take(learner).has_value());  // 427: the next is at 430
  // Another activation live: nothing of the old one's, and the new one's first is whole.
  learner.Install(GatingModel(lo.shape), Activation{2, 0, 420, 0, "rollback"});
  EXPECT_FALSE(cp.Take(learner).has_value());
}

// The online step is one pass of the online options over the new outcome and the recent
// ones the learner's seeded generator draws, each with the prior its decision recorded:
// the learner must stay bit for bit equal to building that batch with MakeTrainSet and
// training on it, whatever it keeps between steps (manifests change midway here, the replay
// buffer wraps, scoring replaces one, and an outcome already learned from is skipped
// without a draw).
TEST(GatingTest, OnlineStepsEqualTrainingOnTheReplayedBatchBitForBit) {
  World w;
  std::vector<LoggedOutcome> logged = Logged(&w, 400);
  LearnerOptions lo;
  lo.shape = SmallShape();
  lo.shape.seed = 3;
  lo.replay_buffer = 50;
  lo.ips_clip = 2.5f;
  FeatureHasher h(lo.shape.bits);
  Learner learner(lo, h, MakeCpuEngine(), MakeCpuEngine());
  Learner batcher(lo, h, MakeCpuEngine(), MakeCpuEngine());  // MakeTrainSet only
  std::map<std::string, SparseVector> current;               // what a decision at this step records
  auto manifest = [&](const std::string& name, const std::string& words) {
    const SparseVector m = h.Manifest({name, "", {words}, {}});
    learner.SetManifest(name, m);
    batcher.SetManifest(name, m);
    current[name] = m;
  };
  manifest("bugfix", "bug login");
  manifest("docs", "docs readme typo");  // "perf" has none until step 150
  GatingModel ref(lo.shape);
  auto engine = MakeCpuEngine();
  std::vector<LoggedOutcome> recent;
  size_t next = 0;
  uint64_t rng = 0;
  auto same = [](const GatingModel& a, const GatingModel& b) {
    auto bits = [](const std::vector<float>& x, const std::vector<float>& y) {
      return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * 4) == 0;
    };
    bool ok = bits(a.emb, b.emb) && bits(a.b1, b.b1) && bits(a.wide, b.wide) &&
              bits(a.g_emb, b.g_emb) && bits(a.g_b1, b.g_b1) && bits(a.g_wide, b.g_wide) &&
              std::memcmp(&a.prior_w, &b.prior_w, 4) == 0 &&
              std::memcmp(&a.prior_b, &b.prior_b, 4) == 0 && a.heads.size() == b.heads.size() &&
              a.g_heads.size() == b.g_heads.size();
    for (const auto& [name, head] : a.heads) {
      auto it = b.heads.find(name);
      ok = ok && it != b.heads.end() && bits(head.w, it->second.w) &&
           std::memcmp(&head.bias, &it->second.bias, 4) == 0 &&
           bits(a.g_heads.at(name), b.g_heads.at(name));
    }
    return ok;
  };
  for (size_t i = 0; i < logged.size(); ++i) {
    if (i == 150) manifest("perf", "faster cache slow");
    if (i == 250) manifest("docs", "docs release");
    if (i == 280) manifest("docs", "docs release");  // the same again: no change
    if (i == 320) {  // scoring with a new manifest replaces the learner's too
      std::vector<ExpertProfile> experts = {{"bugfix", h.Manifest({"bugfix", "", {"flaky"}, {}})}};
      batcher.SetManifest("bugfix", experts[0].manifest);
      current["bugfix"] = experts[0].manifest;
      std::vector<float> scores;
      ScoreInfo info;
      ASSERT_TRUE(learner.Score({h.Task("flaky test", {})}, experts, &scores, &info).ok());
    }
    LoggedOutcome o = logged[i];
    if (i % 7 == 3) o.attempt = 2;
    if (i % 11 == 5) o.forced = true;
    if (i % 5 == 1) o.propensity = 0.2;
    if (i % 13 == 4) o.reward = o.reward > 0 ? 1.5 : 0.25;  // clamped to [0, 1]
    if (i % 3 == 0) o.tags = {{"repo", i % 2 ? "core" : "vite"}};
    // The prior its decision recorded: the online step uses that, not the manifests of now.
    auto m = current.find(o.expert);
    o.prior = m == current.end() ? 0.0f : std::max(0.0f, Dot(h.Task(o.text, o.tags), m->second));
    learner.Observe(o);
    if (i % 9 == 8) learner.Observe(logged[i - 1]);  // already learned from: no step
    std::vector<LoggedOutcome> batch;
    for (int k = 0; k < lo.online_replay && !recent.empty(); ++k) {
      rng = rng * 6364136223846793005ULL + 1442695040888963407ULL + lo.shape.seed;
      batch.push_back(recent[(rng >> 33) % recent.size()]);
    }
    if (static_cast<int>(recent.size()) < lo.replay_buffer)
      recent.push_back(o);
    else
      recent[next++ % recent.size()] = o;
    batch.push_back(o);
    TrainSet set = batcher.MakeTrainSet(batch, 0, batch.size());
    for (size_t k = 0; k < batch.size(); ++k)
      set.rows[k].prior = static_cast<float>(batch[k].prior);
    ASSERT_TRUE(engine->Train(&ref, set, lo.online).ok());
    if (i % 50 == 49) {
      ASSERT_TRUE(same(learner.Snapshot(), ref)) << "after outcome " << i;
    }
  }
  EXPECT_EQ(learner.trained_through(), static_cast<long>(logged.size()));
}

// ---- CUDA against the CPU reference -------------------------------------------------------

class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto e = MakeCudaEngine();
    if (!e.ok()) GTEST_SKIP() << "no CUDA engine here: " << e.status().message();
    cuda_ = std::move(e).value();
  }
  std::unique_ptr<GatingEngine> cuda_;
};

TEST_F(CudaTest, ScoresMatchTheCpuWithin1e4AndPickTheSameExpert) {
  World w;
  std::vector<LoggedOutcome> logged = Logged(&w, 3000);
  LearnerOptions lo;  // the production shape
  Learner learner(lo, FeatureHasher(lo.shape.bits), MakeCpuEngine(), MakeCpuEngine());
  TrainSet set = learner.MakeTrainSet(logged, 0, logged.size());
  GatingModel m(lo.shape);
  auto cpu = MakeCpuEngine();
  ASSERT_TRUE(cpu->Train(&m, set, lo.train).ok());
  FeatureHasher h(lo.shape.bits);
  std::vector<std::string> experts = w.experts;
  for (int e = 0; e < 13; ++e) experts.push_back("new" + std::to_string(e));  // 16, most unseen
  for (int B : {1, 7, 256, 4096}) {
    SparseBatch x;
    std::vector<float> prior;
    std::mt19937 rng(B);
    for (int i = 0; i < B; ++i) {
      int label;
      x.Add(h.Task(w.Text(&label), {}), static_cast<uint32_t>(m.rows() - 1));
      for (size_t e = 0; e < experts.size(); ++e) prior.push_back((rng() % 100) / 400.0f);
    }
    std::vector<float> a, b;
    ASSERT_TRUE(cpu->Score(m, x, experts, prior, &a).ok());
    ASSERT_TRUE(cuda_->Score(m, x, experts, prior, &b).ok());
    ASSERT_EQ(a.size(), b.size());
    int disagree = 0;
    for (int i = 0; i < B; ++i) {
      size_t ba = 0, bb = 0;
      for (size_t e = 0; e < experts.size(); ++e) {
        const size_t k = i * experts.size() + e;
        ASSERT_NEAR(a[k], b[k], 1e-4) << "batch " << B << " row " << i << " expert " << e;
        if (a[k] > a[i * experts.size() + ba]) ba = e;
        if (b[k] > b[i * experts.size() + bb]) bb = e;
      }
      disagree += ba != bb;
    }
    EXPECT_EQ(disagree, 0) << "batch " << B;
  }
}

TEST_F(CudaTest, TrainingIsDeterministicAndAgreesWithTheCpu) {
  World w;
  LearnerOptions lo;
  TrainSet set = BanditSet(&w, &lo);
  GatingModel g1(lo.shape), g2(lo.shape), c(lo.shape);
  ASSERT_TRUE(cuda_->Train(&g1, set, lo.train).ok());
  ASSERT_TRUE(cuda_->Train(&g2, set, lo.train).ok());
  EXPECT_EQ(g1.emb, g2.emb);  // no atomics: bit for bit the same
  EXPECT_EQ(g1.wide, g2.wide);
  EXPECT_EQ(g1.Head("docs")->w, g2.Head("docs")->w);
  auto cpu = MakeCpuEngine();
  ASSERT_TRUE(cpu->Train(&c, set, lo.train).ok());
  // Different rounding (fused multiply-adds, tanhf) drifts over 3000 x 4 steps, but the
  // models agree on what matters: the same decisions, nearly the same estimates.
  World t1, t2;
  t1.rng.seed(7);
  t2.rng.seed(7);
  const double ga = GreedyAccuracy(cuda_.get(), g1, &t1, 500);
  const double ca = GreedyAccuracy(cpu.get(), c, &t2, 500);
  EXPECT_GT(ga, 0.9);
  EXPECT_NEAR(ga, ca, 0.02);
  float max_head_diff = 0;
  for (int k = 0; k < lo.shape.hidden; ++k)
    max_head_diff = std::max(max_head_diff, std::abs(g1.Head("docs")->w[k] - c.Head("docs")->w[k]));
  EXPECT_LT(max_head_diff, 0.05);
}

// Fit's choice of passes rests on held-out losses the engines compute in their own
// rounding: they must choose the same count.
TEST_F(CudaTest, FitChoosesTheSameEpochsAsOnTheCpu) {
  LearnerOptions lo;
  lo.train.epochs = 4;
  World w;
  TrainSet truthful = BanditSet(&w, &lo);
  TrainSet contradicted = truthful;
  for (size_t i = 2700; i < contradicted.rows.size(); ++i)
    contradicted.rows[i].reward = 1 - contradicted.rows[i].reward;
  auto gpu = MakeCudaEngine();
  ASSERT_TRUE(gpu.ok());
  Learner on_gpu(lo, FeatureHasher(lo.shape.bits), MakeCpuEngine(), std::move(gpu).value());
  Learner on_cpu(lo, FeatureHasher(lo.shape.bits), MakeCpuEngine(), MakeCpuEngine());
  for (const TrainSet* set : {&truthful, &contradicted}) {
    FitReport g, c;
    GatingModel mg(lo.shape), mc(lo.shape);
    ASSERT_TRUE(on_gpu.Fit(&mg, *set, &g).ok());
    ASSERT_TRUE(on_cpu.Fit(&mc, *set, &c).ok());
    EXPECT_EQ(g.epochs, c.epochs);
    ASSERT_EQ(g.validation_loss.size(), c.validation_loss.size());
    for (size_t e = 0; e < g.validation_loss.size(); ++e)
      EXPECT_NEAR(g.validation_loss[e], c.validation_loss[e], 1e-3);
  }
}

}  // namespace
}  // namespace cortex
