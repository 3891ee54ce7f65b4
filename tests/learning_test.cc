// Learning users can steer and reproduce (issue 25), end to end through cortexd and
// cortexctl on each store: every decision names the exact weights that made it, `explain`
// rebuilds them bit for bit (before and after a restart, a retrain and a rollback), a
// restart and a rollback change no bit of the live weights, feedback moves routing at once
// and is attributed and bounded, an outcome committed late is learned from, and retrains
// with nothing new are skipped while refused versions are pruned.
#include <gtest/gtest.h>
#include <pwd.h>
#include <unistd.h>

#include <filesystem>
#include <string>
#include <vector>

#include "pg/pg_server.h"
#include "testutil.h"

namespace cortex {
namespace {

using test::Daemon;
using test::TempDir;
using json = nlohmann::json;

// `redis` succeeds; `web` fails. The manifests favour `redis` for "restart redis" tasks.
const char* kExperts = R"(experts:
  - name: redis
    plugin: command
    run: ["/bin/sh", "-c", "cat >/dev/null"]
    keywords: ["redis", "cache", "restart"]
  - name: web
    plugin: command
    run: ["/bin/sh", "-c", "cat >/dev/null; exit 2"]
    keywords: ["web", "frontend", "page"]
  - name: slow
    plugin: command
    run: ["/bin/sh", "-c", "cat >/dev/null; sleep 2"]
    keywords: ["nightly", "backup"]
rules:
  - name: held
    match: ["waits forever"]
    expert: not-loaded
    force: true
)";

std::string Me() {
  struct passwd* pw = getpwuid(geteuid());
  return pw ? pw->pw_name : "uid:" + std::to_string(geteuid());
}

class Learning : public ::testing::TestWithParam<std::string> {
 protected:
  // A daemon on this test's backend, learning online, never retraining on its own.
  std::unique_ptr<Daemon> NewDaemon(
      const std::string& training,
      const std::string& router = "router: {exploration: 0, seed: 1, max_attempts: 1}\n",
      const std::string& experts = kExperts) {
    auto d = std::make_unique<Daemon>(dir_, experts + training, router);
    if (GetParam() == "postgresql") {
      std::string why;
      test::PgServer* pg = test::PgServer::Get(&why);
      if (!pg) return nullptr;
      d->UseStoreUrl(pg->NewDatabase());
    }
    return d;
  }
  void SetUp() override {
    if (GetParam() == "postgresql") {
      std::string why;
      if (!test::PgServer::Get(&why)) GTEST_SKIP() << "no PostgreSQL server: " << why;
    }
  }
  static std::string Submit(const Daemon& d, const std::string& text) {
    test::Run r = d.Ctl({"submit", text, "--wait", "--no-repo", "--json"});
    EXPECT_TRUE(r.code == 0 || r.code == 1) << r.err;
    return r.Json().value("id", "");
  }
  // The live model has learned from every outcome and verdict the store holds.
  static void Settle(const Daemon& d, long steps) {
    ASSERT_TRUE(test::Eventually([&] {
      return d.CtlJson({"models"})["live"].value("step", -1L) >= steps;
    })) << d.CtlJson({"models"}).dump();
  }
  // Each candidate's model score, by expert.
  static std::map<std::string, double> Scores(const Daemon& d, const std::string& text) {
    std::map<std::string, double> out;
    const json route = d.CtlJson({"route", text, "--no-repo"});
    for (const auto& c : route["candidates"])
      out[c["expert"].get<std::string>()] = c["model_score"].get<double>();
    EXPECT_FALSE(out.empty()) << route.dump();
    return out;
  }
  static void ExpectExplained(const Daemon& d, const std::string& id) {
    json e = d.CtlJson({"explain", id});
    ASSERT_TRUE(e.contains("candidates")) << e.dump();
    EXPECT_TRUE(e["equal"].get<bool>()) << e.dump();
    json shown = d.CtlJson({"show", id});
    EXPECT_EQ(e["model_step"], shown["decision"]["model_step"]) << shown.dump();
    EXPECT_EQ(e["model_version"], shown["decision"]["model_version"]);
    for (const auto& c : e["candidates"]) {
      // Bit for bit: the doubles printed are the same floats.
      EXPECT_EQ(c["model_score"].get<double>(), c["recorded_model_score"].get<double>())
          << c.dump();
      EXPECT_FALSE(c["features"].empty()) << c.dump();
    }
  }

  TempDir dir_;
};

TEST_P(Learning, RestartRollbackAndExplainAreBitForBit) {
  auto d = NewDaemon(
      "training: {interval: 1h, min_new_outcomes: 100000, checkpoint_every: 3}\n");  // deltas
  ASSERT_TRUE(d && d->Start()) << (d ? d->Log() : "");
  std::vector<std::string> ids;
  for (int i = 0; i < 12; ++i)
    ids.push_back(Submit(*d, i % 3 ? "restart redis on host " + std::to_string(i)
                                   : "fix the web page " + std::to_string(i)));
  Settle(*d, 12);
  json shown = d->CtlJson({"show", ids[5]});
  EXPECT_EQ(shown["decision"]["model_version"], "v0");
  EXPECT_GE(shown["decision"]["model_step"].get<long>(), 0) << shown.dump();
  // Decisions before the restart rebuild exactly, from a checkpoint or the start.
  for (size_t i : {0, 5, 11}) ExpectExplained(*d, ids[i]);
  json ex = d->CtlJson({"explain", ids[11]});
  // From the newest checkpoint at or before its step (every 3: a whole one at 3, deltas on
  // it after), replaying the rest.
  const long step = ex["model_step"].get<long>();
  EXPECT_EQ(ex["from_checkpoint"].get<long>(), step - step % 3) << ex.dump();
  EXPECT_EQ(ex["replayed_steps"].get<long>(), step % 3) << ex.dump();
  // The features are words, not buckets.
  bool worded = false;
  for (const auto& f : ex["candidates"][0]["features"])
    worded |= f["feature"].get<std::string>().find("word:") == 0;
  EXPECT_TRUE(worded) << ex.dump();
  test::Run text = d->Ctl({"explain", ids[11].substr(0, 8)});
  EXPECT_EQ(text.code, 0) << text.err;
  EXPECT_NE(text.out.find("bit for bit"), std::string::npos) << text.out;

  // A restart changes no bit of the live weights.
  const auto before = Scores(*d, "restart redis now");
  const json live_before = d->CtlJson({"models"})["live"];
  ASSERT_EQ(d->Stop(), 0);
  ASSERT_TRUE(d->Start()) << d->Log();
  EXPECT_EQ(Scores(*d, "restart redis now"), before);
  EXPECT_EQ(d->CtlJson({"models"})["live"], live_before);
  for (size_t i : {0, 5, 11}) ExpectExplained(*d, ids[i]);
  ids.push_back(Submit(*d, "restart redis after the restart"));
  Settle(*d, 13);
  ExpectExplained(*d, ids.back());

  // A retrain (refused: too few held-out decisions) and a forced rollback to it: exactly
  // its saved weights are live, at step 0, however often one goes there.
  json rt = d->CtlJson({"retrain", "--wait"});
  ASSERT_EQ(rt["version"], 1) << rt.dump();
  ASSERT_EQ(d->Ctl({"models", "rollback", "1", "--force"}).code, 0);
  json live = d->CtlJson({"models"})["live"];
  EXPECT_EQ(live["version"], 1);
  EXPECT_EQ(live["step"], 0);
  const auto v1 = Scores(*d, "restart redis now");
  ids.push_back(Submit(*d, "restart redis under v1"));
  ids.push_back(Submit(*d, "fix the web page under v1"));
  Settle(*d, 2);
  EXPECT_NE(Scores(*d, "restart redis now"), v1);  // it learned since
  ASSERT_EQ(d->Ctl({"models", "rollback", "0"}).code, 0);
  ASSERT_EQ(d->Ctl({"models", "rollback", "1", "--force"}).code, 0);
  EXPECT_EQ(Scores(*d, "restart redis now"), v1);
  // Every decision still rebuilds: under v0 before and after the restart, under v1.
  for (const auto& id : ids) ExpectExplained(*d, id);
  // router.seed draws exploration only: a new one changes no learned weight.
  ASSERT_EQ(d->Stop(), 0);
  std::string cfg = test::ReadFile(d->config);
  cfg.replace(cfg.find("seed: 1"), 7, "seed: 5");
  test::WriteFile(d->config, cfg);
  ASSERT_TRUE(d->Start()) << d->Log();
  EXPECT_EQ(Scores(*d, "restart redis now"), v1);
  for (const auto& id : ids) ExpectExplained(*d, id);
  // Steps past the last checkpoint, then a start with online learning off: the same
  // weights (a clean stop saves them), and no more steps.
  ids.push_back(Submit(*d, "restart redis once more"));
  Settle(*d, 1);
  const auto stepped = Scores(*d, "restart redis now");
  const json live_stepped = d->CtlJson({"models"})["live"];
  EXPECT_NE(live_stepped["step"].get<long>() % 3, 0) << live_stepped.dump();  // off the grid
  ASSERT_EQ(d->Stop(), 0);
  cfg = test::ReadFile(d->config);
  cfg.replace(cfg.find("training: {"), 11, "training: {online: false, ");
  test::WriteFile(d->config, cfg);
  ASSERT_TRUE(d->Start()) << d->Log();
  EXPECT_EQ(Scores(*d, "restart redis now"), stepped);
  EXPECT_EQ(d->CtlJson({"models"})["live"]["step"], live_stepped["step"]);
  EXPECT_EQ(d->Log().find("are not learned"), std::string::npos) << d->Log();
  Submit(*d, "restart redis with online learning off");
  EXPECT_EQ(Scores(*d, "restart redis now"), stepped);
  for (const auto& id : ids) ExpectExplained(*d, id);

  // A forced decision is still scored (every loaded expert): it rebuilds too. An unknown
  // task is a clear error.
  const std::string held = d->CtlJson({"submit", "this waits forever", "--no-repo"})["id"];
  ASSERT_EQ(d->Ctl({"cancel", held}).code, 0);
  ExpectExplained(*d, held);
  test::Run r = d->Ctl({"explain", "nosuchtask"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("nosuchtask"), std::string::npos) << r.err;
}

// A clean stop lets running tasks end and learns their outcomes before it saves the live
// weights, so a start with online learning off has them; after a crash such a start lacks
// the steps past the last checkpoint, and says so.
TEST_P(Learning, AStopLearnsWhatTheGraceBroughtAndACrashSaysWhatItLost) {
  auto d = NewDaemon("training: {interval: 1h, min_new_outcomes: 100000, checkpoint_every: 3}\n");
  ASSERT_TRUE(d && d->Start()) << (d ? d->Log() : "");
  for (int i = 0; i < 4; ++i) Submit(*d, "restart redis on host " + std::to_string(i));
  Settle(*d, 4);
  const auto stepped = Scores(*d, "restart redis now");
  const long step = d->CtlJson({"models"})["live"]["step"];
  // A task still running at the stop ends within the grace (2 s of 10).
  const std::string late = d->CtlJson({"submit", "nightly backup", "--no-repo"})["id"];
  ASSERT_TRUE(test::Eventually([&] { return d->CtlJson({"show", late})["state"] == "running"; }));
  ASSERT_EQ(d->Stop(), 0);
  EXPECT_NE(d->Log().find("stopping: learned the last 1 event(s)"), std::string::npos) << d->Log();
  std::string cfg = test::ReadFile(d->config);
  cfg.replace(cfg.find("training: {"), 11, "training: {online: false, ");
  test::WriteFile(d->config, cfg);
  ASSERT_TRUE(d->Start()) << d->Log();
  EXPECT_EQ(d->CtlJson({"show", late})["state"], "succeeded");
  EXPECT_EQ(d->CtlJson({"models"})["live"]["step"], step + 1);
  const auto with_late = Scores(*d, "restart redis now");
  EXPECT_NE(with_late, stepped);
  Submit(*d, "restart redis with online learning off");
  EXPECT_EQ(Scores(*d, "restart redis now"), with_late);
  ExpectExplained(*d, late);
  EXPECT_EQ(d->Log().find("are not learned"), std::string::npos) << d->Log();

  // After a crash, a start with online learning off lacks the steps taken after the last
  // checkpoint (they died with the process): it says so, not in silence.
  ASSERT_EQ(d->Stop(), 0);
  cfg.replace(cfg.find("online: false"), 13, "online: true");
  test::WriteFile(d->config, cfg);
  ASSERT_TRUE(d->Start()) << d->Log();
  long at = d->CtlJson({"models"})["live"]["step"];
  // Two steps or more, the last one just past a step the loop checkpointed or skipped
  // (at % 3 == 2: no grid point between them), so the newest is not in a checkpoint.
  for (int n = 0; n < 2 || at % 3 != 2; ++n) {
    Submit(*d, "restart redis before a crash");
    Settle(*d, ++at);
  }
  ASSERT_EQ(d->Stop(SIGKILL), 128 + SIGKILL);
  cfg.replace(cfg.find("online: true"), 12, "online: false");
  test::WriteFile(d->config, cfg);
  ASSERT_TRUE(d->Start()) << d->Log();
  EXPECT_NE(d->Log().find("training.online is off: learning events after event"), std::string::npos)
      << d->Log();
  EXPECT_LT(d->CtlJson({"models"})["live"]["step"].get<long>(), at) << d->Log();
}

TEST_P(Learning, FeedbackMovesRoutingAtOnceAttributedAndBounded) {
  auto d = NewDaemon("training: {interval: 1h, min_new_outcomes: 100000, feedback_per_hour: 35}\n");
  ASSERT_TRUE(d && d->Start()) << (d ? d->Log() : "");
  std::vector<std::string> ids;
  for (int i = 0; i < 40; ++i)
    ids.push_back(Submit(*d, "restart redis on host " + std::to_string(i)));
  Settle(*d, 40);
  json route = d->CtlJson({"route", "restart redis", "--no-repo"});
  ASSERT_EQ(route["candidates"][0]["expert"], "redis") << route.dump();
  EXPECT_GT(route["candidates"][0]["confidence"].get<double>(), 0.9) << route.dump();

  // People say those runs were bad: the first pick moves away, with no retrain.
  int verdicts = 0;  // given so far
  while (verdicts < 30) {
    test::Run r = d->Ctl({"feedback", ids[verdicts], "--bad", "--note", "did not restart it"});
    ASSERT_EQ(r.code, 0) << r.err;
    ++verdicts;
    Settle(*d, 40 + verdicts);
    if (d->CtlJson({"route", "restart redis", "--no-repo"})["candidates"][0]["expert"] != "redis")
      break;
  }
  EXPECT_NE(d->CtlJson({"route", "restart redis", "--no-repo"})["candidates"][0]["expert"], "redis")
      << "after " << verdicts << " verdicts";
  std::printf("[ measured ] the first pick moved after %d verdicts (of 40 successes)\n", verdicts);
  EXPECT_EQ(d->CtlJson({"models"})["models"].size(), 1u) << "no retrain ran";

  // Attributed: who gave it, on which attempt.
  json t = d->CtlJson({"show", ids[0]});
  ASSERT_EQ(t["feedback"].size(), 1u) << t.dump();
  EXPECT_EQ(t["feedback"][0]["by"], Me());
  EXPECT_EQ(t["feedback"][0]["attempt"], 1);
  EXPECT_EQ(t["outcome"]["quality"].get<double>(), 0.0);
  // One person's latest verdict counts: changing one's mind replaces, a repeat adds nothing.
  json fb = d->CtlJson({"feedback", ids[0], "--bad"});
  EXPECT_FALSE(fb["learned"].get<bool>()) << fb.dump();
  fb = d->CtlJson({"feedback", ids[0], "--good"});
  EXPECT_TRUE(fb["learned"].get<bool>()) << fb.dump();
  EXPECT_EQ(fb["reward"].get<double>(), 1.0);
  EXPECT_EQ(d->CtlJson({"show", ids[0]})["outcome"]["quality"].get<double>(), 1.0);

  // The per-person bound: 35 in an hour, then a clear refusal that records nothing.
  for (int given = verdicts + 2, i = verdicts; given < 35; ++given, ++i)
    ASSERT_EQ(d->Ctl({"feedback", ids[i], "--bad"}).code, 0);
  test::Run over = d->Ctl({"feedback", ids[39], "--bad"});
  EXPECT_EQ(over.code, 1);
  EXPECT_NE(over.err.find("training.feedback_per_hour"), std::string::npos) << over.err;
  EXPECT_EQ(d->CtlJson({"show", ids[39]})["feedback"].size(), 0u);

  // Nor has one whose only attempt was interrupted (cancelled while it ran).
  const std::string cut = d->CtlJson({"submit", "nightly backup", "--no-repo"})["id"];
  ASSERT_TRUE(test::Eventually([&] { return d->CtlJson({"show", cut})["state"] == "running"; }));
  ASSERT_EQ(d->Ctl({"cancel", cut}).code, 0);
  ASSERT_TRUE(test::Eventually([&] { return d->CtlJson({"show", cut})["state"] == "cancelled"; }));
  test::Run cr = d->Ctl({"feedback", cut, "--good"});
  EXPECT_EQ(cr.code, 1) << d->CtlJson({"show", cut}).dump();
  EXPECT_NE(cr.err.find("nothing to judge"), std::string::npos) << cr.err;
  // A task that never ran an attempt has nothing to judge.
  const std::string held = d->CtlJson({"submit", "this waits forever", "--no-repo"})["id"];
  ASSERT_EQ(d->Ctl({"cancel", held}).code, 0);
  test::Run r = d->Ctl({"feedback", held, "--bad"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("never finished an attempt"), std::string::npos) << r.err;
}

// An attempt that started first and finished last is still learned from: online steps
// follow the store's commit sequence, not the order attempts started in.
TEST_P(Learning, AnOutcomeCommittedLateIsStillLearnedFrom) {
  auto d = NewDaemon("training: {interval: 1h, min_new_outcomes: 100000}\n");
  ASSERT_TRUE(d && d->Start()) << (d ? d->Log() : "");
  const std::string slow = d->CtlJson({"submit", "nightly backup", "--no-repo"})["id"];
  ASSERT_TRUE(test::Eventually([&] { return d->CtlJson({"show", slow})["state"] == "running"; }));
  for (int i = 0; i < 5; ++i) Submit(*d, "restart redis on host " + std::to_string(i));
  Settle(*d, 5);
  ASSERT_EQ(d->Ctl({"wait", slow}).code, 0);
  Settle(*d, 6);  // 5 fast, then the slow one: six steps, none skipped
  const std::string after = Submit(*d, "nightly backup again");
  EXPECT_EQ(d->CtlJson({"show", after})["decision"]["model_step"], 6);
  ExpectExplained(*d, after);
}

TEST_P(Learning, EmptyRetrainsAreSkippedAndRefusedVersionsPruned) {
  auto d = NewDaemon("training: {interval: 1h, min_new_outcomes: 100000, keep_versions: 2}\n");
  ASSERT_TRUE(d && d->Start()) << (d ? d->Log() : "");
  for (int round = 0; round < 4; ++round) {
    Submit(*d, "restart redis round " + std::to_string(round));
    json rt = d->CtlJson({"retrain", "--wait"});
    EXPECT_EQ(rt.value("status", ""), "refused") << rt.dump();  // too few held out
  }
  // Nothing new: skipped, nothing saved.
  test::Run r = d->Ctl({"retrain", "--wait"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("skipped: no new outcome or verdict since v4"), std::string::npos) << r.out;
  json models = d->CtlJson({"models"})["models"];
  std::vector<std::string> names;
  for (const auto& m : models) names.push_back(m["name"]);
  EXPECT_EQ(names, (std::vector<std::string>{"v0", "v3", "v4"})) << models.dump();
  // A verdict changes the data (a reward): the next retrain is not skipped; then it is.
  const std::string judged = Submit(*d, "restart redis once more");
  ASSERT_EQ(d->CtlJson({"retrain", "--wait"})["version"], 5);
  ASSERT_EQ(d->Ctl({"feedback", judged, "--bad"}).code, 0);
  ASSERT_EQ(d->CtlJson({"retrain", "--wait"})["version"], 6);
  r = d->Ctl({"retrain", "--wait"});
  EXPECT_NE(r.out.find("skipped: no new outcome or verdict since v6"), std::string::npos) << r.out;
}

// The retrain gate end to end (issue 26): a candidate is promoted when it is estimated
// better than what the live system did on the held-out decisions, and refused, saying
// so, when it is worse; `retrain --wait` and `models` show both verdicts.
TEST_P(Learning, ARetrainIsPromotedWhenBetterThanTheLiveSystemAndRefusedWhenWorse) {
  // The manifests send deploy tasks to `bad`; `good` succeeds, unless the world is flipped.
  const std::string flipped = dir_ / "flipped";
  const std::string experts = R"(experts:
  - name: bad
    plugin: command
    run: ["/bin/sh", "-c", "cat >/dev/null; test -e )" +
                              flipped + R"("]
    keywords: ["deploy", "release", "ship", "rollout"]
  - name: good
    plugin: command
    run: ["/bin/sh", "-c", "cat >/dev/null; test ! -e )" +
                              flipped + R"("]
    keywords: ["maintenance"]
)";
  // First without online learning: the live system routes with v0's weights throughout.
  auto d = NewDaemon("training: {online: false, interval: 1h, min_new_outcomes: 100000}\n",
                     "router: {exploration: 0.5, seed: 1, max_attempts: 1}\n", experts);
  ASSERT_TRUE(d && d->Start()) << (d ? d->Log() : "");
  auto submit = [&](int n) {
    for (int i = 0; i < n; ++i) Submit(*d, "deploy the release " + std::to_string(i % 7));
  };
  auto first = [&] {
    return d->CtlJson({"route", "deploy the release 1", "--no-repo"})["candidates"][0]["expert"];
  };
  EXPECT_EQ(first(), "bad");
  // v0 sends most tasks to `bad`, which fails, and explores `good`. A candidate trained on
  // that picks `good` on the held-out decisions: better than what v0 did there.
  submit(100);
  test::Run r = d->Ctl({"retrain", "--wait"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("PROMOTED"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("candidate estimated better than the live system"), std::string::npos)
      << r.out;
  json models = d->CtlJson({"models"})["models"];
  ASSERT_EQ(models.size(), 2u) << models.dump();
  const json& v1 = models[1]["metrics"];
  EXPECT_GT(v1["diff"]["value"].get<double>(), 0) << v1.dump();
  EXPECT_GE(v1["holdout_rows"].get<long>(), 20) << v1.dump();
  EXPECT_NE(v1["baseline"].get<std::string>().find("the live system's greedy picks"),
            std::string::npos);
  EXPECT_EQ(first(), "good");

  // Then the world changes for a while (`good` fails, `bad` succeeds) and changes back for
  // the newest tasks, which are the holdout (20% of 375 outcomes: the last 75). v1, routing
  // without online learning, keeps picking `good`: right on every held-out task. A candidate
  // trained on the window, mostly the changed world and that world last, picks `bad` there:
  // worse than what the live system did, and refused, saying so.
  test::WriteFile(flipped, "");
  submit(200);
  std::filesystem::remove(flipped);
  submit(75);
  EXPECT_EQ(first(), "good");
  r = d->Ctl({"retrain", "--wait"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("refused"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("candidate estimated worse than the live system"), std::string::npos)
      << r.out;
  models = d->CtlJson({"models"})["models"];
  ASSERT_EQ(models.size(), 3u) << models.dump();
  EXPECT_EQ(models[2]["status"], "refused");
  EXPECT_LT(models[2]["metrics"]["diff"]["value"].get<double>(), 0) << models[2].dump();
  EXPECT_EQ(models[2]["metrics"]["holdout_rows"], 75) << models[2].dump();
  EXPECT_EQ(models[2]["metrics"]["candidate_policy"], "static: its trained weights");
  EXPECT_TRUE(models[1]["live"].get<bool>()) << models.dump();
  r = d->Ctl({"models"});
  EXPECT_NE(r.out.find("v2    refused"), std::string::npos) << r.out;
}

// Population training end to end: training.population candidates are fitted per retrain,
// each reported (passes; its validation loss or why it was not judged), and one kept. Here
// the window is too small for a validation slice (fewer than 1,000 training rows), so none
// is judged and the trainer as configured is kept; choosing among judged ones is
// GatingTest.APopulationKeepsTheVariantThatScoresBestOnTheValidationSlice.
TEST_P(Learning, APopulationOfCandidatesIsFittedReportedAndOneKept) {
  auto d = NewDaemon("training: {interval: 1h, min_new_outcomes: 100000, population: 4}\n",
                     "router: {exploration: 0.3, seed: 1, max_attempts: 1}\n");
  ASSERT_TRUE(d && d->Start()) << (d ? d->Log() : "");
  for (int i = 0; i < 60; ++i)
    Submit(*d, i % 2 ? "restart redis on host " + std::to_string(i)
                     : "fix the web page " + std::to_string(i));
  test::Run r = d->Ctl({"retrain", "--wait"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("at most 4 epochs, a population of 4 candidates"), std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("warm: not fitted (no saved live version to start from)"), std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("fresh, double steps: 4 pass(es) (not judged: too few training rows"),
            std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("kept the fresh candidate"), std::string::npos) << r.out;
  const json m = d->CtlJson({"models"})["models"][1]["metrics"];
  ASSERT_EQ(m["population"].size(), 4u) << m.dump();
  EXPECT_EQ(m["population"][2]["variant"], "fresh, half steps");
  EXPECT_FALSE(m["population"][2]["eligible"].get<bool>());
  EXPECT_TRUE(m["population"][2].contains("diff")) << m.dump();   // estimated, reported
  EXPECT_FALSE(m["population"][1].contains("diff")) << m.dump();  // warm: not fitted
  EXPECT_EQ(m["kept"], "fresh");
  // Out of range: a clear refusal at start.
  ASSERT_EQ(d->Stop(), 0);
  std::string cfg = test::ReadFile(d->config);
  cfg.replace(cfg.find("population: 4"), 13, "population: 5");
  test::WriteFile(d->config, cfg);
  EXPECT_FALSE(d->Start());
  EXPECT_NE(d->Log().find("training.population: must be between 1 and 4"), std::string::npos)
      << d->Log();
}

INSTANTIATE_TEST_SUITE_P(Stores, Learning, ::testing::Values("sqlite", "postgresql"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace cortex
