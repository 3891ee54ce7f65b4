// The same suite runs against every store backend: in memory and a real WAL file.
#include <gtest/gtest.h>
#include <libpq-fe.h>
#include <sqlite3.h>

#include <signal.h>
#include <sys/resource.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <optional>
#include <thread>

#include "cortex/store.h"
#include "cortex/store_url.h"
#include "pg/pg_server.h"
#include "testutil.h"

namespace cortex {
namespace {

class StoreTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (GetParam() == "postgresql") {
      std::string why;
      test::PgServer* pg = test::PgServer::Get(&why);
      if (!pg) GTEST_SKIP() << "no PostgreSQL server: " << why;
      path_ = pg->NewDatabase();
      ASSERT_FALSE(path_.empty()) << "cannot create a database for the test";
    } else {
      path_ = GetParam() == ":memory:" ? ":memory:" : dir_ / "cortex.db";
    }
    Result<std::unique_ptr<Store>> s = OpenStore(path_);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    store_ = std::move(s).value();
  }
  Task NewTask(const std::string& id, double t, const std::string& text = "fix the login bug") {
    Task task;
    task.id = id;
    task.text = text;
    task.tags = {{"repo", "/tmp/r"}};
    task.created_at = t;
    EXPECT_TRUE(store_->InsertTask(task).ok());
    return task;
  }
  Decision NewDecision(const std::string& chosen, double conf) {
    Decision d;
    d.time = 1;
    d.model_version = "prior-v1";
    d.chosen = chosen;
    d.propensity = 0.9;
    d.explored = false;
    Candidate a{chosen, 0.3, 0.2, -0.1, -0.05, 0.5, conf, {"r1"}};
    Candidate b{"other", 0, 0.1, 0, 0, 0.1, 1 - conf, {}};
    d.candidates = {a, b};
    return d;
  }
  void Run(const std::string& id, int n, const std::string& expert, OutcomeKind k, double q) {
    ASSERT_TRUE(store_->StartAttempt(id, n, expert, 2).ok());
    Outcome o;
    o.kind = k;
    o.quality = q;
    o.output = "out";
    ASSERT_TRUE(store_->FinishAttempt(id, n, o, 3).ok());
  }

  Status Judge(const std::string& id, double time, double q, const std::string& note = "",
               const std::string& by = "ann", int per_hour = 0, FeedbackResult* res = nullptr) {
    FeedbackResult r;
    return store_->AddFeedback(id, {time, q, note, by}, per_hour, res ? res : &r);
  }
  std::vector<LoggedOutcome> Events(long after) {
    std::vector<LoggedOutcome> out;
    EXPECT_TRUE(store_
                    ->ForEachLearnEvent(after,
                                        [&](const LoggedOutcome& o) {
                                          out.push_back(o);
                                          return true;
                                        })
                    .ok());
    return out;
  }
  Status SetLive(int version) {
    long id = 0;
    return store_->SetLiveModel(version, 0, "rollback", 1, &id);
  }

  test::TempDir dir_;
  std::string path_;
  std::unique_ptr<Store> store_;
};

TEST_P(StoreTest, RoundTripsTaskDecisionAttemptsFeedback) {
  NewTask("t1", 100);
  ASSERT_TRUE(store_->RecordDecision("t1", NewDecision("security", 0.8)).ok());
  Run("t1", 1, "security", OutcomeKind::kFailure, 0);
  Run("t1", 2, "other", OutcomeKind::kSuccess, 0.9);
  ASSERT_TRUE(store_->FinishTask("t1", TaskState::kSucceeded, "other", 4).ok());
  ASSERT_TRUE(Judge("t1", 5, 0.25, "meh").ok());

  Task t;
  ASSERT_TRUE(store_->GetTask("t1", &t).ok());
  EXPECT_EQ(t.text, "fix the login bug");
  ASSERT_EQ(t.tags.size(), 1u);
  EXPECT_EQ(t.tags[0].second, "/tmp/r");
  EXPECT_EQ(t.state, TaskState::kSucceeded);
  EXPECT_EQ(t.expert, "other");
  ASSERT_TRUE(t.decision);
  EXPECT_EQ(t.decision->chosen, "security");
  EXPECT_DOUBLE_EQ(t.decision->propensity, 0.9);
  ASSERT_EQ(t.decision->candidates.size(), 2u);
  EXPECT_EQ(t.decision->candidates[0].rules, std::vector<std::string>{"r1"});
  EXPECT_DOUBLE_EQ(t.decision->candidates[0].load_bias, -0.1);
  EXPECT_DOUBLE_EQ(t.decision->candidates[0].health_bias, -0.05);
  ASSERT_EQ(t.attempts.size(), 2u);
  EXPECT_EQ(t.attempts[0].outcome->kind, OutcomeKind::kFailure);
  EXPECT_EQ(t.attempts[1].outcome->kind, OutcomeKind::kSuccess);
  ASSERT_EQ(t.feedback.size(), 1u);
  EXPECT_DOUBLE_EQ(t.feedback[0].quality, 0.25);
}

// A decision names the weights that scored it (activation and step; none recorded: -1),
// and each candidate's prior, which learning events carry for their expert.
TEST_P(StoreTest, DecisionsNameTheWeightsThatScored) {
  NewTask("p", 1);
  ASSERT_TRUE(store_->RecordDecision("p", NewDecision("a", 0.5)).ok());
  Task t;
  ASSERT_TRUE(store_->GetTask("p", &t).ok());
  EXPECT_EQ(t.decision->model_step, -1);
  EXPECT_EQ(t.decision->model_live, 0);
  NewTask("s", 2);
  Decision d = NewDecision("a", 0.5);
  d.model_step = 12;
  d.model_live = 3;
  d.candidates[0].prior = 0.75;
  ASSERT_TRUE(store_->RecordDecision("s", d).ok());
  ASSERT_TRUE(store_->GetTask("s", &t).ok());
  EXPECT_EQ(t.decision->model_step, 12);
  EXPECT_EQ(t.decision->model_live, 3);
  EXPECT_DOUBLE_EQ(t.decision->candidates[0].prior, 0.75);
  Run("s", 1, "a", OutcomeKind::kSuccess, 1);
  std::vector<LoggedOutcome> ev = Events(0);
  ASSERT_EQ(ev.size(), 1u);
  EXPECT_DOUBLE_EQ(ev[0].prior, 0.75);
  ASSERT_EQ(ev[0].candidates.size(), 2u);
  EXPECT_DOUBLE_EQ(ev[0].candidates[0].prior, 0.75);
  EXPECT_DOUBLE_EQ(ev[0].candidates[0].model_score, 0.2);
}

// A verdict judges the last attempt that is training data: an interrupted or crashed one
// after it says nothing about an answer, so the verdict goes to the one before; a task
// with only such attempts has nothing to judge.
TEST_P(StoreTest, AVerdictSkipsInterruptedAndCrashedAttempts) {
  NewTask("v", 100);
  ASSERT_TRUE(store_->RecordDecision("v", NewDecision("security", 0.8)).ok());
  Run("v", 1, "security", OutcomeKind::kFailure, 0);
  Run("v", 2, "other", OutcomeKind::kCrash, 0);
  Run("v", 3, "third", OutcomeKind::kInterrupted, 0);
  FeedbackResult res;
  ASSERT_TRUE(Judge("v", 5, 1.0, "", "ann", 0, &res).ok());
  EXPECT_EQ(res.attempt, 1);
  EXPECT_EQ(res.expert, "security");
  EXPECT_GT(res.learn_seq, 0);  // the failure became a success: a learning event

  NewTask("w", 100);
  ASSERT_TRUE(store_->RecordDecision("w", NewDecision("security", 0.8)).ok());
  Run("w", 1, "security", OutcomeKind::kInterrupted, 0);
  Status s = Judge("w", 5, 1.0);
  EXPECT_EQ(s.code(), Status::Code::kFailedPrecondition) << s.message();
  EXPECT_NE(s.message().find("nothing to judge"), std::string::npos) << s.message();
}

TEST_P(StoreTest, UnknownIdsAreNotFoundAndChangeNothing) {
  Task t;
  EXPECT_EQ(store_->GetTask("nope", &t).code(), Status::Code::kNotFound);
  EXPECT_EQ(Judge("nope", 1, 1).code(), Status::Code::kNotFound);
  EXPECT_EQ(store_->FinishTask("nope", TaskState::kFailed, "x", 1).code(), Status::Code::kNotFound);
  std::vector<std::pair<std::string, long>> counts;
  ASSERT_TRUE(store_->CountByState(&counts).ok());
  EXPECT_TRUE(counts.empty());
}

TEST_P(StoreTest, DuplicateIdIsRefused) {
  NewTask("dup", 1);
  Task t;
  t.id = "dup";
  t.text = "again";
  EXPECT_FALSE(store_->InsertTask(t).ok());
}

TEST_P(StoreTest, HistoryFiltersAndOrdersNewestFirst) {
  for (int i = 0; i < 5; ++i) {
    std::string id = "h" + std::to_string(i);
    NewTask(id, 100 + i, "task " + std::to_string(i));
    ASSERT_TRUE(store_->RecordDecision(id, NewDecision(i % 2 ? "a" : "b", 0.6)).ok());
    Run(id, 1, i % 2 ? "a" : "b", i < 3 ? OutcomeKind::kSuccess : OutcomeKind::kTimeout, 1);
    ASSERT_TRUE(store_
                    ->FinishTask(id, i < 3 ? TaskState::kSucceeded : TaskState::kFailed,
                                 i % 2 ? "a" : "b", 5)
                    .ok());
  }
  std::vector<HistoryRow> rows;
  ASSERT_TRUE(store_->History({}, &rows).ok());
  ASSERT_EQ(rows.size(), 5u);
  EXPECT_EQ(rows[0].id, "h4");
  EXPECT_EQ(rows[0].outcome, "timeout");
  HistoryQuery q;
  q.expert = "a";
  ASSERT_TRUE(store_->History(q, &rows).ok());
  EXPECT_EQ(rows.size(), 2u);
  // An outcome kind matches the last attempt's outcome, not "anything but success".
  q = {};
  q.outcome = "timeout";
  ASSERT_TRUE(store_->History(q, &rows).ok());
  EXPECT_EQ(rows.size(), 2u);
  q.outcome = "failure";
  ASSERT_TRUE(store_->History(q, &rows).ok());
  EXPECT_EQ(rows.size(), 0u);
  q.outcome = "success";
  ASSERT_TRUE(store_->History(q, &rows).ok());
  EXPECT_EQ(rows.size(), 3u);
  q = {};
  q.since = 103;
  ASSERT_TRUE(store_->History(q, &rows).ok());
  EXPECT_EQ(rows.size(), 2u);
  q = {};
  q.limit = 1;
  ASSERT_TRUE(store_->History(q, &rows).ok());
  EXPECT_EQ(rows.size(), 1u);
}

// History is in the store's order, whatever the tasks' clocks said: a task stamped an
// hour in the future (a node whose clock runs ahead) does not stay on top, and one
// stamped in the past (a clock stepped back) is not hidden below the older ones.
TEST_P(StoreTest, HistoryIsInTheStoresOrderNotTheClocks) {
  NewTask("first", 10000, "first");
  NewTask("future", 10000 + 7200, "stamped two hours ahead");
  NewTask("past", 10000 - 3600, "stamped an hour back");
  NewTask("last", 10001, "last");
  std::vector<HistoryRow> rows;
  ASSERT_TRUE(store_->History({}, &rows).ok());
  ASSERT_EQ(rows.size(), 4u);
  std::vector<std::string> ids;
  for (const auto& r : rows) ids.push_back(r.id);
  EXPECT_EQ(ids, (std::vector<std::string>{"last", "past", "future", "first"}));
  for (size_t i = 1; i < rows.size(); ++i) EXPECT_GT(rows[i - 1].seq, rows[i].seq);
  // after_seq: what a follower asks for, the tasks stored after one it has seen.
  HistoryQuery q;
  q.after_seq = rows[2].seq;  // "future"
  ASSERT_TRUE(store_->History(q, &rows).ok());
  ids.clear();
  for (const auto& r : rows) ids.push_back(r.id);
  EXPECT_EQ(ids, (std::vector<std::string>{"last", "past"}));
}

TEST_P(StoreTest, StatsCountRoutingSuccessAndCalibration) {
  for (int i = 0; i < 4; ++i) {
    std::string id = "s" + std::to_string(i);
    NewTask(id, i);
    ASSERT_TRUE(store_->RecordDecision(id, NewDecision("a", 0.75)).ok());
    Run(id, 1, "a", i == 0 ? OutcomeKind::kFailure : OutcomeKind::kSuccess, i == 0 ? 0 : 1);
    ASSERT_TRUE(
        store_->FinishTask(id, i == 0 ? TaskState::kFailed : TaskState::kSucceeded, "a", 1).ok());
  }
  ASSERT_TRUE(Judge("s1", 1, 0.0, "wrong").ok());  // overrides quality 1
  std::vector<ExpertStats> stats;
  ASSERT_TRUE(store_->Stats(&stats).ok());
  ASSERT_EQ(stats.size(), 1u);
  EXPECT_EQ(stats[0].routed, 4);
  EXPECT_EQ(stats[0].attempts, 4);
  EXPECT_EQ(stats[0].successes, 3);
  EXPECT_DOUBLE_EQ(stats[0].mean_quality, 0.5);  // (0 + 0[feedback] + 1 + 1) / 4
  EXPECT_DOUBLE_EQ(stats[0].mean_confidence, 0.75);
  EXPECT_DOUBLE_EQ(stats[0].first_success_rate, 0.75);
  EXPECT_NEAR(stats[0].brier, (0.75 * 0.75 + 3 * 0.25 * 0.25) / 4, 1e-12);
}

TEST_P(StoreTest, RecoverRequeuesUnstartedAndInterruptsRunning) {
  NewTask("q", 1);
  NewTask("r", 2);
  ASSERT_TRUE(store_->RecordDecision("r", NewDecision("a", 0.5)).ok());
  NewTask("run", 3);
  ASSERT_TRUE(store_->RecordDecision("run", NewDecision("a", 0.5)).ok());
  ASSERT_TRUE(store_->StartAttempt("run", 1, "a", 4).ok());
  NewTask("done", 4);
  ASSERT_TRUE(store_->FinishTask("done", TaskState::kSucceeded, "a", 5).ok());

  Store::Recovery rec;
  ASSERT_TRUE(store_->Recover(10, true, &rec).ok());
  EXPECT_EQ(rec.interrupted, 1);
  EXPECT_TRUE(rec.poisoned.empty());
  ASSERT_EQ(rec.requeue.size(), 2u);
  EXPECT_EQ(rec.requeue[0].id, "q");
  EXPECT_EQ(rec.requeue[1].id, "r");
  EXPECT_EQ(rec.requeue[0].deaths, 0) << "merely queued: no death counted against it";
  Task t;
  ASSERT_TRUE(store_->GetTask("run", &t).ok());
  EXPECT_EQ(t.state, TaskState::kInterrupted);
  ASSERT_EQ(t.attempts.size(), 1u);
  EXPECT_EQ(t.attempts[0].outcome->kind, OutcomeKind::kInterrupted);
}

// A clock set back across a kill -9 and a restart (the outside attack): what recovery
// ends is never stamped before it began.
TEST_P(StoreTest, RecoveryStampsNothingBeforeItBegan) {
  NewTask("run", 10000);
  ASSERT_TRUE(store_->RecordDecision("run", NewDecision("a", 0.5)).ok());
  ASSERT_TRUE(store_->StartAttempt("run", 1, "a", 10001).ok());
  Store::Recovery rec;
  ASSERT_TRUE(store_->Recover(5000, false, &rec).ok());
  EXPECT_EQ(rec.interrupted, 1);
  Task t;
  ASSERT_TRUE(store_->GetTask("run", &t).ok());
  EXPECT_EQ(t.state, TaskState::kInterrupted);
  EXPECT_GE(t.updated_at, t.created_at);
  ASSERT_EQ(t.attempts.size(), 1u);
  EXPECT_GE(t.attempts[0].finished_at, t.attempts[0].started_at);
}

// A task that was being routed when cortexd died, twice, is failed with the reason on the
// next start instead of being retried (and killing cortexd) forever.
TEST_P(StoreTest, ATaskInFlightAtTwoDeathsIsFailedNotRetried) {
  NewTask("poison", 1);
  NewTask("mate", 2);
  NewTask("bystander", 3);
  Store::Recovery rec;
  for (int start = 0; start < 2; ++start) {
    // Routed alongside a batch mate the first time; alone (as a suspect) the second.
    ASSERT_TRUE(store_
                    ->MarkRouting(start == 0 ? std::vector<std::string>{"poison", "mate"}
                                             : std::vector<std::string>{"poison"})
                    .ok());
    ASSERT_TRUE(store_->Recover(10 + start, true, &rec).ok());  // cortexd crashed routing
  }
  ASSERT_EQ(rec.poisoned, std::vector<std::string>{"poison"});
  ASSERT_EQ(rec.requeue.size(), 2u);
  EXPECT_EQ(rec.requeue[0].id, "mate");
  EXPECT_EQ(rec.requeue[0].deaths, 1);
  EXPECT_EQ(rec.requeue[1].deaths, 0);
  Task t;
  ASSERT_TRUE(store_->GetTask("poison", &t).ok());
  EXPECT_EQ(t.state, TaskState::kFailed);
  EXPECT_NE(t.error.find("poison-task guard"), std::string::npos) << t.error;
  // A decision recorded clears the mark: a later death is not counted against it.
  ASSERT_TRUE(store_->MarkRouting({"mate"}).ok());
  ASSERT_TRUE(store_->RecordDecision("mate", NewDecision("a", 0.5)).ok());
  ASSERT_TRUE(store_->Recover(20, true, &rec).ok());
  EXPECT_TRUE(rec.poisoned.empty());
  ASSERT_TRUE(store_->GetTask("mate", &t).ok());
  EXPECT_EQ(t.deaths, 1);
  EXPECT_EQ(t.state, TaskState::kRouted);
}

// A kill from outside (kill -9, power loss) is not the task's doing: however often it
// lands while a task is routed, the task is retried, never failed by the guard.
TEST_P(StoreTest, KillsFromOutsideCountNoDeaths) {
  NewTask("innocent", 1);
  Store::Recovery rec;
  for (int start = 0; start < 5; ++start) {
    ASSERT_TRUE(store_->MarkRouting({"innocent"}).ok());
    ASSERT_TRUE(store_->Recover(10 + start, false, &rec).ok());
  }
  EXPECT_TRUE(rec.poisoned.empty());
  ASSERT_EQ(rec.requeue.size(), 1u);
  EXPECT_EQ(rec.requeue[0].deaths, 0);
  // The mark was cleared: a later crash elsewhere does not count against it.
  ASSERT_TRUE(store_->Recover(20, true, &rec).ok());
  ASSERT_EQ(rec.requeue.size(), 1u);
  EXPECT_EQ(rec.requeue[0].deaths, 0);
}

TEST_P(StoreTest, ExportVisitsEveryTaskInOrder) {
  for (int i = 0; i < 600; ++i) NewTask("e" + std::to_string(i), i);
  std::vector<std::string> ids;
  ASSERT_TRUE(store_
                  ->ForEachTask(0,
                                [&](const Task& t) {
                                  ids.push_back(t.id);
                                  return true;
                                })
                  .ok());
  ASSERT_EQ(ids.size(), 600u);
  EXPECT_EQ(ids.front(), "e0");
  EXPECT_EQ(ids.back(), "e599");
  ids.clear();
  ASSERT_TRUE(store_
                  ->ForEachTask(590,
                                [&](const Task& t) {
                                  ids.push_back(t.id);
                                  return true;
                                })
                  .ok());
  EXPECT_EQ(ids.size(), 10u);
}

TEST_P(StoreTest, ExpertEventsAreKeptNewestFirst) {
  ASSERT_TRUE(store_->RecordExpertEvent({1, "a", "/p/a.so", "loaded", "v1"}).ok());
  ASSERT_TRUE(store_->RecordExpertEvent({2, "", "/p/b.so", "refused", "bad ABI"}).ok());
  std::vector<ExpertEvent> ev;
  ASSERT_TRUE(store_->ExpertEvents(10, &ev).ok());
  ASSERT_EQ(ev.size(), 2u);
  EXPECT_EQ(ev[0].event, "refused");
  // (PostgreSQL v4: the cluster; v5 there and v4 in SQLite: the learning log)
  EXPECT_EQ(store_->SchemaVersion(), IsPostgresUrl(path_) ? 5 : 4);
}

TEST_P(StoreTest, LoggedOutcomesFeedTrainingWithFeedbackOverriding) {
  NewTask("t1", 100, "fix the login bug");
  Decision d = NewDecision("security", 0.8);
  d.greedy = "other";
  d.explored = true;
  ASSERT_TRUE(store_->RecordDecision("t1", d).ok());
  Run("t1", 1, "security", OutcomeKind::kFailure, 0.7);  // a failure's quality is no reward
  Run("t1", 2, "other", OutcomeKind::kSuccess, 0.9);
  ASSERT_TRUE(store_->FinishTask("t1", TaskState::kSucceeded, "other", 4).ok());
  ASSERT_TRUE(Judge("t1", 5, 0.25, "meh").ok());
  NewTask("t2", 101, "still running");
  ASSERT_TRUE(store_->RecordDecision("t2", NewDecision("other", 0.5)).ok());
  ASSERT_TRUE(store_->StartAttempt("t2", 1, "other", 2).ok());  // unfinished: not training data
  NewTask("t3", 102, "crashy");
  ASSERT_TRUE(store_->RecordDecision("t3", NewDecision("other", 0.5)).ok());
  Run("t3", 1, "other", OutcomeKind::kCrash, 0);  // a health signal, not training data

  std::vector<LoggedOutcome> out;
  ASSERT_TRUE(store_
                  ->ForEachOutcome(0,
                                   [&](const LoggedOutcome& o) {
                                     out.push_back(o);
                                     return true;
                                   })
                  .ok());
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(out[0].expert, "security");
  EXPECT_EQ(out[0].attempt, 1);
  EXPECT_DOUBLE_EQ(out[0].reward, 0.0);
  EXPECT_DOUBLE_EQ(out[0].propensity, 0.9);
  EXPECT_EQ(out[0].greedy, "other");
  EXPECT_EQ(out[0].text, "fix the login bug");
  ASSERT_EQ(out[0].candidates.size(), 2u);
  EXPECT_EQ(out[0].candidates[0].expert, "security");
  EXPECT_DOUBLE_EQ(out[0].candidates[0].rule_score, 0.3);
  // What the live model knew then, for the retrain gate's reference.
  EXPECT_DOUBLE_EQ(out[0].candidates[0].model_score, 0.2);
  EXPECT_DOUBLE_EQ(out[0].candidates[1].model_score, 0.1);
  EXPECT_EQ(out[1].expert, "other");
  EXPECT_DOUBLE_EQ(out[1].reward, 0.25);     // the person's verdict beats the expert's 0.9
  EXPECT_DOUBLE_EQ(out[1].propensity, 1.0);  // a fallback was not drawn
  EXPECT_LT(out[0].seq, out[1].seq);
  std::vector<LoggedOutcome> after;
  ASSERT_TRUE(store_
                  ->ForEachOutcome(out[0].seq,
                                   [&](const LoggedOutcome& o) {
                                     after.push_back(o);
                                     return true;
                                   })
                  .ok());
  ASSERT_EQ(after.size(), 1u);
  EXPECT_EQ(after[0].seq, out[1].seq);
  long start = -1;
  ASSERT_TRUE(store_->OutcomeWindowStart(1, &start).ok());  // the newest one only
  EXPECT_EQ(start, out[0].seq);
  ASSERT_TRUE(store_->OutcomeWindowStart(5, &start).ok());  // fewer than 5: everything
  EXPECT_EQ(start, 0);
}

TEST_P(StoreTest, ReportAggregatesWhatThePagePlots) {
  // Three routed tasks and one still queued in [1000, 1100], two buckets of 50 s; and
  // rows outside the window that must not count.
  auto decide = [&](const std::string& id, double t, const std::string& chosen, double conf,
                    const std::string& version, bool explored) {
    Decision d;
    d.time = t;
    d.model_version = version;
    d.chosen = chosen;
    d.propensity = explored ? 0.05 : 0.95;
    d.explored = explored;
    d.candidates = {{chosen, 0.3, 0.2, 0, 0, 0.5, conf, {"r1"}}, {"z", 0, 0.1, 0, 0, 0.1, 0.1, {}}};
    ASSERT_TRUE(store_->RecordDecision(id, d).ok());
  };
  auto attempt = [&](const std::string& id, int n, const std::string& expert, OutcomeKind k,
                     double start, double end, std::optional<TaskState> ends) {
    ASSERT_TRUE(store_->StartAttempt(id, n, expert, start).ok());
    Outcome o;
    o.kind = k;
    ASSERT_TRUE(store_->FinishAttempt(id, n, o, end, ends).ok());
  };
  NewTask("old", 500);
  decide("old", 500, "a", 0.9, "v0", false);
  attempt("old", 1, "a", OutcomeKind::kSuccess, 500, 501, TaskState::kSucceeded);
  NewTask("t1", 1000);
  decide("t1", 1000, "a", 0.85, "v0", false);
  attempt("t1", 1, "a", OutcomeKind::kSuccess, 1000, 1000.5, TaskState::kSucceeded);
  NewTask("t2", 1010);
  decide("t2", 1010, "a", 0.85, "v1", false);
  attempt("t2", 1, "a", OutcomeKind::kFailure, 1010, 1011, std::nullopt);
  attempt("t2", 2, "b", OutcomeKind::kSuccess, 1011, 1012, TaskState::kSucceeded);
  NewTask("t3", 1090);
  decide("t3", 1090, "b", 0.25, "v1", true);
  attempt("t3", 1, "b", OutcomeKind::kFailure, 1090, 1095, std::nullopt);
  ASSERT_TRUE(store_->FinishTask("t3", TaskState::kFailed, "b", 1095).ok());
  NewTask("t4", 1099);
  ASSERT_TRUE(store_->RecordExpertEvent({1050, "b", "b.so", "crash", "SIGSEGV"}).ok());
  ASSERT_TRUE(store_->RecordExpertEvent({2000, "b", "b.so", "crash", "later"}).ok());
  ASSERT_TRUE(store_->SaveModel({1, 1060, "promoted", true, 3, R"({"promoted":true})", "w"}).ok());
  ASSERT_TRUE(store_->SaveModel({2, 1200, "refused", false, 4, "{}", "w"}).ok());

  ReportQuery q;
  q.since = 1000;
  q.until = 1100;
  q.buckets = 2;
  q.tasks_per_bucket = 0;
  ReportData r;
  Status rs = store_->Report(q, &r);
  ASSERT_TRUE(rs.ok()) << rs.ToString();
  EXPECT_EQ(r.tasks, 4);
  EXPECT_DOUBLE_EQ(r.bucket_s, 50);
  EXPECT_EQ(r.decided, (std::vector<long>{2, 1}));
  EXPECT_EQ(r.first_done, (std::vector<long>{2, 1}));
  EXPECT_EQ(r.first_ok, (std::vector<long>{1, 0}));
  EXPECT_EQ(r.model_version, (std::vector<int>{1, 1}));
  EXPECT_EQ(r.finished, (std::vector<long>{2, 1}));
  EXPECT_EQ(r.succeeded, (std::vector<long>{2, 0}));
  EXPECT_NEAR(r.latency_mean[0], 1.25, 1e-9);  // (0.5 + 2) / 2
  EXPECT_NEAR(r.latency_max[0], 2, 1e-9);
  EXPECT_NEAR(r.latency_mean[1], 5, 1e-9);
  ASSERT_EQ(r.share.size(), 2u);
  EXPECT_EQ(r.share[0].first, "a");
  EXPECT_EQ(r.share[0].second, (std::vector<long>{2, 0}));
  EXPECT_EQ(r.share[1].second, (std::vector<long>{0, 1}));
  ASSERT_EQ(r.calibration.size(), 2u);
  const auto& ca = r.calibration[0];
  EXPECT_EQ(ca.expert, "a");
  EXPECT_EQ(ca.n, 2);
  EXPECT_EQ(ca.bin_n[8], 2);
  EXPECT_NEAR(ca.bin_confidence[8], 0.85, 1e-9);
  EXPECT_NEAR(ca.bin_success[8], 0.5, 1e-9);
  EXPECT_NEAR(ca.brier, (0.15 * 0.15 + 0.85 * 0.85) / 2, 1e-9);
  EXPECT_EQ(r.calibration[1].bin_n[2], 1);
  EXPECT_NEAR(r.calibration[1].brier, 0.0625, 1e-9);
  // Latencies 0.5, 2 and 5 s land in the buckets whose edges they are.
  long counted = 0;
  for (size_t i = 0; i < r.latency_counts.size(); ++i) {
    counted += r.latency_counts[i];
    if (r.latency_counts[i]) {
      ASSERT_LT(i, r.latency_edges.size());
      const double e = r.latency_edges[i];
      EXPECT_TRUE(std::abs(e - 0.5) < 1e-9 || std::abs(e - 2) < 1e-9 || std::abs(e - 5) < 1e-9)
          << e;
    }
  }
  EXPECT_EQ(counted, 3);
  ASSERT_EQ(r.events.size(), 1u);
  EXPECT_EQ(r.events[0].first, "crash");
  EXPECT_EQ(r.events[0].second, (std::vector<long>{0, 1}));
  ASSERT_EQ(r.recent_events.size(), 1u);
  EXPECT_EQ(r.recent_events[0].detail, "SIGSEGV");
  ASSERT_EQ(r.rules.size(), 1u);
  EXPECT_EQ(r.rules[0], (std::pair<std::string, long>{"r1", 3}));
  ASSERT_EQ(r.models.size(), 1u);
  EXPECT_EQ(r.models[0].version, 1);
  EXPECT_EQ(r.models[0].metrics, R"({"promoted":true})");

  // Edges ascend, a millisecond to an hour.
  EXPECT_TRUE(std::is_sorted(r.latency_edges.begin(), r.latency_edges.end()));
  EXPECT_DOUBLE_EQ(r.latency_edges.front(), 0.001);
  EXPECT_DOUBLE_EQ(r.latency_edges.back(), 3600);

  // Without a window, it spans the activity: from the oldest task to the last thing that
  // happened (the refused model at 1200); a small log gets one bucket per task, at most
  // ten.
  ReportData all;
  ASSERT_TRUE(store_->Report({}, &all).ok());
  EXPECT_DOUBLE_EQ(all.since, 500);
  EXPECT_DOUBLE_EQ(all.until, 2000);  // the last event
  EXPECT_EQ(all.tasks, 5);
  EXPECT_EQ(all.decided.size(), 5u);
  long decided = 0;
  for (long d : all.decided) decided += d;
  EXPECT_EQ(decided, 4);
}

TEST_P(StoreTest, AReportOfAnEmptyStoreIsEmptyNotAnError) {
  ReportData r;
  Status rs = store_->Report({}, &r);
  ASSERT_TRUE(rs.ok()) << rs.ToString();
  EXPECT_EQ(r.tasks, 0);
  ASSERT_EQ(r.decided.size(), 1u);
  EXPECT_EQ(r.decided[0], 0);
  EXPECT_TRUE(r.share.empty());
  EXPECT_TRUE(r.calibration.empty());
  EXPECT_TRUE(r.models.empty());
}

TEST_P(StoreTest, ModelVersionsAreKeptAndOneIsLive) {
  ModelRecord a{1, 10, "refused", false, 5, R"({"x":1})", std::string("w1\0w", 4)};
  ModelRecord b{2, 20, "promoted", false, 9, R"({"x":2})", "weights-2"};
  ASSERT_TRUE(store_->SaveModel(a).ok());
  ASSERT_TRUE(store_->SaveModel(b).ok());
  EXPECT_FALSE(store_->SaveModel(b).ok());  // versions are never overwritten
  ASSERT_TRUE(SetLive(2).ok());
  std::vector<ModelRecord> ms;
  ASSERT_TRUE(store_->ListModels(&ms).ok());
  ASSERT_EQ(ms.size(), 2u);
  EXPECT_FALSE(ms[0].live);
  EXPECT_TRUE(ms[1].live);
  EXPECT_TRUE(ms[1].weights.empty());  // listings leave the weights out
  EXPECT_EQ(ms[1].weights_bytes, 9);
  EXPECT_EQ(ms[0].metrics, R"({"x":1})");
  ModelRecord got;
  ASSERT_TRUE(store_->LoadModel(1, &got).ok());
  EXPECT_EQ(got.weights, a.weights);
  EXPECT_EQ(got.trained_through, 5);
  EXPECT_EQ(store_->LoadModel(7, &got).code(), Status::Code::kNotFound);
  EXPECT_EQ(SetLive(7).code(), Status::Code::kNotFound);
  ASSERT_TRUE(store_->ListModels(&ms).ok());
  EXPECT_TRUE(ms[1].live);  // a refused rollback changes nothing
  ASSERT_TRUE(SetLive(1).ok());
  ASSERT_TRUE(store_->ListModels(&ms).ok());
  EXPECT_TRUE(ms[0].live);
  EXPECT_FALSE(ms[1].live);
  ASSERT_TRUE(SetLive(0).ok());  // back to the untrained model: none live
  ASSERT_TRUE(store_->ListModels(&ms).ok());
  EXPECT_FALSE(ms[0].live || ms[1].live);
  // A promoted candidate is saved and made live in one step (one transaction), so no
  // stop in between can list a version as promoted that never was live.
  ModelRecord c{3, 30, "promoted", true, 12, R"({"x":3})", "weights-3"};
  ASSERT_TRUE(store_->SaveModel(c).ok());
  ASSERT_TRUE(store_->ListModels(&ms).ok());
  ASSERT_EQ(ms.size(), 3u);
  EXPECT_TRUE(ms[2].live);
  EXPECT_FALSE(ms[0].live || ms[1].live);
  // A failed save (a version that exists) leaves the live version as it was.
  ModelRecord dup{3, 40, "promoted", true, 13, "{}", "w"};
  EXPECT_FALSE(store_->SaveModel(dup).ok());
  ASSERT_TRUE(store_->ListModels(&ms).ok());
  EXPECT_TRUE(ms[2].live);
}

// The learning log numbers outcomes as they commit, not as their attempts started: an
// attempt that started first and finished last comes after one that started later, and
// a reader that has seen the later one still gets it (issue 25: one committed late was
// skipped). Verdicts are events too, in the same sequence.
TEST_P(StoreTest, LearningEventsAreNumberedAsTheyCommit) {
  NewTask("slow", 1, "slow task");
  NewTask("fast", 2, "fast task");
  ASSERT_TRUE(store_->RecordDecision("slow", NewDecision("a", 0.5)).ok());
  ASSERT_TRUE(store_->RecordDecision("fast", NewDecision("b", 0.5)).ok());
  ASSERT_TRUE(store_->StartAttempt("slow", 1, "a", 2).ok());
  ASSERT_TRUE(store_->StartAttempt("fast", 1, "b", 2).ok());
  Outcome ok;
  ok.kind = OutcomeKind::kSuccess;
  ok.quality = 1;
  ASSERT_TRUE(store_->FinishAttempt("fast", 1, ok, 3, TaskState::kSucceeded).ok());
  std::vector<LoggedOutcome> first = Events(0);
  ASSERT_EQ(first.size(), 1u);
  EXPECT_EQ(first[0].task_id, "fast");
  ASSERT_TRUE(store_->FinishAttempt("slow", 1, ok, 4, TaskState::kSucceeded).ok());
  std::vector<LoggedOutcome> later = Events(first[0].seq);  // resumes after what it saw
  ASSERT_EQ(later.size(), 1u);
  EXPECT_EQ(later[0].task_id, "slow");
  EXPECT_GT(later[0].seq, first[0].seq);
  long any = 0, outcome = 0;
  ASSERT_TRUE(store_->NewestLearnSeq(&any, &outcome).ok());
  EXPECT_EQ(any, later[0].seq);
  EXPECT_EQ(outcome, later[0].seq);

  // A verdict: a learning event with the corrected reward, after both outcomes.
  FeedbackResult fr;
  ASSERT_TRUE(Judge("fast", 10, 0.0, "wrong expert", "ann", 0, &fr).ok());
  EXPECT_EQ(fr.attempt, 1);
  EXPECT_EQ(fr.expert, "b");
  EXPECT_DOUBLE_EQ(fr.reward, 0.0);
  EXPECT_GT(fr.learn_seq, later[0].seq);
  std::vector<LoggedOutcome> fb = Events(later[0].seq);
  ASSERT_EQ(fb.size(), 1u);
  EXPECT_TRUE(fb[0].feedback);
  EXPECT_EQ(fb[0].expert, "b");
  EXPECT_DOUBLE_EQ(fb[0].reward, 0.0);
  ASSERT_TRUE(store_->NewestLearnSeq(&any, &outcome).ok());
  EXPECT_EQ(any, fr.learn_seq);
  EXPECT_EQ(outcome, later[0].seq);  // a verdict is no new outcome
  // The online events keep each reward as it was; a retrain's outcomes have it as now.
  std::vector<LoggedOutcome> all = Events(0);
  ASSERT_EQ(all.size(), 3u);
  EXPECT_DOUBLE_EQ(all[0].reward, 1.0);
  std::vector<LoggedOutcome> outcomes;
  ASSERT_TRUE(store_
                  ->ForEachOutcome(0,
                                   [&](const LoggedOutcome& o) {
                                     outcomes.push_back(o);
                                     return true;
                                   })
                  .ok());
  ASSERT_EQ(outcomes.size(), 2u);
  EXPECT_EQ(outcomes[0].task_id, "fast");
  EXPECT_DOUBLE_EQ(outcomes[0].reward, 0.0);
  std::vector<LoggedOutcome> range;
  ASSERT_TRUE(store_->LearnEvents(all[0].seq, all[2].seq, 0, &range).ok());
  ASSERT_EQ(range.size(), 2u);
  EXPECT_EQ(range[0].task_id, "slow");
  ASSERT_TRUE(store_->LearnEvents(0, all[2].seq, 2, &range).ok());  // the newest two
  ASSERT_EQ(range.size(), 2u);
  EXPECT_EQ(range[0].task_id, "slow");
  EXPECT_TRUE(range[1].feedback);
  ASSERT_TRUE(store_->LearnEvents(0, all[1].seq, 5, &range).ok());  // fewer than 5: all
  ASSERT_EQ(range.size(), 2u);
  EXPECT_EQ(range[0].task_id, "fast");
}

// One person's latest verdict counts; several people's are averaged; a repeat that changes
// nothing is no new learning event; a task that never finished an attempt is refused; the
// per-person bound refuses the verdict past it and counts nobody else's.
TEST_P(StoreTest, VerdictsAreAttributedBoundedAndOnePerPersonCounts) {
  NewTask("t", 1, "restart redis");
  ASSERT_TRUE(store_->RecordDecision("t", NewDecision("ops", 0.5)).ok());
  Run("t", 1, "ops", OutcomeKind::kSuccess, 1.0);
  ASSERT_TRUE(store_->FinishTask("t", TaskState::kSucceeded, "ops", 3).ok());
  FeedbackResult r;
  ASSERT_TRUE(Judge("t", 10, 0.0, "", "ann", 0, &r).ok());
  EXPECT_DOUBLE_EQ(r.reward, 0.0);
  EXPECT_GT(r.learn_seq, 0);
  ASSERT_TRUE(Judge("t", 11, 0.0, "", "ann", 0, &r).ok());  // the same again: no event
  EXPECT_EQ(r.learn_seq, 0);
  ASSERT_TRUE(Judge("t", 12, 1.0, "", "bob", 0, &r).ok());
  EXPECT_DOUBLE_EQ(r.reward, 0.5);                          // ann 0, bob 1
  ASSERT_TRUE(Judge("t", 13, 1.0, "", "ann", 0, &r).ok());  // ann changes her mind
  EXPECT_DOUBLE_EQ(r.reward, 1.0);
  Task t;
  ASSERT_TRUE(store_->GetTask("t", &t).ok());
  ASSERT_EQ(t.feedback.size(), 4u);
  EXPECT_EQ(t.feedback[2].by, "bob");
  EXPECT_EQ(t.feedback[2].attempt, 1);

  // ann gave 3 in the hour before 20: a bound of 3 refuses her fourth, not bob's second.
  EXPECT_EQ(Judge("t", 20, 0.0, "", "ann", 3).code(), Status::Code::kResourceExhausted);
  EXPECT_TRUE(Judge("t", 20, 0.0, "", "bob", 3).ok());
  EXPECT_TRUE(Judge("t", 20 + 3600, 0.0, "", "ann", 3).ok());  // an hour on

  NewTask("q", 2, "never ran");
  Status st = Judge("q", 5, 0.0);
  EXPECT_EQ(st.code(), Status::Code::kFailedPrecondition) << st.ToString();
  EXPECT_NE(st.message().find("never finished an attempt"), std::string::npos) << st.message();
}

// Which version is live from which learning event on, and the checkpoints of its online
// learning; pruning keeps every version that was ever live.
TEST_P(StoreTest, ActivationsCheckpointsAndPruning) {
  Activation a;
  EXPECT_EQ(store_->LiveActivation(&a).code(), Status::Code::kNotFound);
  long id1 = 0, id2 = 0;
  ASSERT_TRUE(store_->SetLiveModel(0, 7, "initial", 100, &id1).ok());
  ASSERT_TRUE(store_->LiveActivation(&a).ok());
  EXPECT_EQ(a.id, id1);
  EXPECT_EQ(a.version, 0);
  EXPECT_EQ(a.after_seq, 7);
  EXPECT_EQ(a.reason, "initial");
  ModelRecord m{1, 200, "promoted", true, 9, "{}", "w1"};
  ASSERT_TRUE(store_->SaveModel(m, &id2).ok());
  EXPECT_GT(id2, id1);
  ASSERT_TRUE(store_->LiveActivation(&a).ok());
  EXPECT_EQ(a.version, 1);
  EXPECT_EQ(a.after_seq, 9);
  ASSERT_TRUE(store_->GetActivation(id1, &a).ok());
  EXPECT_EQ(a.version, 0);
  EXPECT_EQ(store_->GetActivation(999, &a).code(), Status::Code::kNotFound);

  const std::string blob("ck\0pt", 5);
  ASSERT_TRUE(store_->SaveCheckpoint({id2, 100, 109, 0xFEDCBA9876543210ULL, blob}).ok());
  ASSERT_TRUE(store_->SaveCheckpoint({id2, 100, 109, 1, "other"}).ok());  // exists: kept
  ASSERT_TRUE(store_->SaveCheckpoint({id2, 200, 209, 2, "two"}).ok());
  Checkpoint c;
  EXPECT_EQ(store_->LoadCheckpoint(id2, 99, &c).code(), Status::Code::kNotFound);
  ASSERT_TRUE(store_->LoadCheckpoint(id2, 150, &c).ok());
  EXPECT_EQ(c.step, 100);
  EXPECT_EQ(c.seq, 109);
  EXPECT_EQ(c.rng, 0xFEDCBA9876543210ULL);
  EXPECT_EQ(c.weights, blob);
  ASSERT_TRUE(store_->LoadCheckpoint(id2, 1000, &c).ok());
  EXPECT_EQ(c.step, 200);
  EXPECT_EQ(store_->LoadCheckpoint(id1, 1000, &c).code(), Status::Code::kNotFound);

  for (int v = 2; v <= 6; ++v)
    ASSERT_TRUE(store_->SaveModel({v, 300.0 + v, "refused", false, 9, "{}", "w"}).ok());
  long id3 = 0;
  ASSERT_TRUE(store_->SetLiveModel(3, 9, "rollback", 400, &id3).ok());  // v3 was live once
  ASSERT_TRUE(SetLive(1).ok());
  std::vector<int> gone;
  ASSERT_TRUE(store_->PruneModels(2, &gone).ok());
  EXPECT_EQ(gone, (std::vector<int>{4, 2}));  // 6 and 5 are the newest two; 3 was live
  std::vector<ModelRecord> ms;
  ASSERT_TRUE(store_->ListModels(&ms).ok());
  std::vector<int> left;
  for (const auto& x : ms) left.push_back(x.version);
  EXPECT_EQ(left, (std::vector<int>{1, 3, 5, 6}));
}

// Concurrent writers share commits (group commit); each write still gets its own answer:
// one that fails is undone alone and fails only its caller, and every write that
// answered OK is there afterwards, also after the store is opened again.
TEST_P(StoreTest, ConcurrentWritesShareCommitsButKeepTheirOwnResults) {
  constexpr int kThreads = 16, kEach = 60;
  std::atomic<int> bad_ok{0}, good_failed{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; ++t)
    ts.emplace_back([&, t] {
      for (int i = 0; i < kEach; ++i) {
        const std::string id = "c" + std::to_string(t) + "-" + std::to_string(i);
        Task task;
        task.id = id;
        task.text = "concurrent";
        task.created_at = t * 1000 + i;
        if (!store_->InsertTask(task).ok()) ++good_failed;
        Decision d = NewDecision("a", 0.5);
        if (!store_->RecordDecision(id, d).ok()) ++good_failed;
        // Interleaved with the good writes: writes that must fail, alone.
        if (store_->InsertTask(task).ok()) ++bad_ok;  // a duplicate id
        if (store_->FinishTask("nosuch-" + id, TaskState::kFailed, "a", 1).ok()) ++bad_ok;
        if (!store_->StartAttempt(id, 1, "a", 2).ok()) ++good_failed;
        Outcome o;
        o.kind = OutcomeKind::kSuccess;
        o.quality = 1;
        if (!store_->FinishAttempt(id, 1, o, 3).ok()) ++good_failed;
        if (!store_->FinishTask(id, TaskState::kSucceeded, "a", 4).ok()) ++good_failed;
      }
    });
  for (auto& t : ts) t.join();
  EXPECT_EQ(good_failed.load(), 0);
  EXPECT_EQ(bad_ok.load(), 0);
  auto check = [&](Store* s) {
    std::vector<std::pair<std::string, long>> counts;
    ASSERT_TRUE(s->CountByState(&counts).ok());
    long succeeded = 0, all = 0;
    for (const auto& [state, n] : counts) {
      all += n;
      if (state == "succeeded") succeeded = n;
    }
    EXPECT_EQ(succeeded, kThreads * kEach);
    EXPECT_EQ(all, kThreads * kEach);
    Task t;
    ASSERT_TRUE(s->GetTask("c7-33", &t).ok());
    ASSERT_EQ(t.attempts.size(), 1u);
    EXPECT_EQ(t.attempts[0].outcome->kind, OutcomeKind::kSuccess);
  };
  check(store_.get());
  if (path_ == ":memory:") return;
  store_.reset();
  Result<std::unique_ptr<Store>> again = OpenStore(path_);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  check(again->get());
}

// A disk that fills up under concurrent writers fails every write of a group (none is
// half kept), and each, retried once space returns, lands exactly once.
TEST_P(StoreTest, AFullDiskFailsWholeGroupsAndRetriesLandOnce) {
  if (path_ == ":memory:") GTEST_SKIP() << "needs a file to fill";
  if (IsPostgresUrl(path_))
    GTEST_SKIP() << "the disk that fills is the PostgreSQL server's: its errors reach us as "
                    "any failed statement, which the other cases cover";
  NewTask("first", 1);
  constexpr int kThreads = 8, kEach = 10;
  struct sigaction ign = {}, old = {};
  ign.sa_handler = SIG_IGN;
  ASSERT_EQ(sigaction(SIGXFSZ, &ign, &old), 0);  // a write past the limit fails instead
  struct rlimit was = {}, full = {};
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &was), 0);
  full = {4096, was.rlim_max};
  std::atomic<bool> space{false};
  std::atomic<int> failed_while_full{0}, refused_on_retry{0};
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &full), 0);
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; ++t)
    ts.emplace_back([&, t] {
      for (int i = 0; i < kEach; ++i) {
        Task task;
        task.id = "full" + std::to_string(t) + "-" + std::to_string(i);
        task.text = "written while the disk is full";
        task.created_at = 2;
        for (;;) {
          Status st = store_->InsertTask(task);
          if (st.ok()) break;
          if (!space.load()) ++failed_while_full;
          if (st.message().find("UNIQUE") != std::string::npos) {  // an earlier try was kept
            ++refused_on_retry;
            break;
          }
          std::this_thread::sleep_for(std::chrono::milliseconds(5));
        }
      }
    });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &was), 0);
  space = true;
  for (auto& t : ts) t.join();
  sigaction(SIGXFSZ, &old, nullptr);
  EXPECT_GT(failed_while_full.load(), 0) << "the limit never bit";
  EXPECT_EQ(refused_on_retry.load(), 0) << "a write that failed was kept anyway";
  std::vector<std::pair<std::string, long>> counts;
  ASSERT_TRUE(store_->CountByState(&counts).ok());
  long all = 0;
  for (const auto& [state, n] : counts) all += n;
  EXPECT_EQ(all, 1 + kThreads * kEach);
}

// A batch of decisions is recorded together; an unknown task fails alone.
TEST_P(StoreTest, DecisionsRecordedAsABatchFailOneByOne) {
  NewTask("b1", 1);
  NewTask("b3", 3);
  Decision d1 = NewDecision("a", 0.6), d2 = NewDecision("a", 0.7), d3 = NewDecision("b", 0.8);
  std::vector<Status> st;
  store_->RecordDecisions({{"b1", &d1}, {"b2-unknown", &d2}, {"b3", &d3}}, &st);
  ASSERT_EQ(st.size(), 3u);
  EXPECT_TRUE(st[0].ok()) << st[0].ToString();
  EXPECT_FALSE(st[1].ok());
  EXPECT_NE(st[1].message().find("b2-unknown"), std::string::npos) << st[1].ToString();
  EXPECT_TRUE(st[2].ok()) << st[2].ToString();
  Task t;
  ASSERT_TRUE(store_->GetTask("b3", &t).ok());
  EXPECT_EQ(t.state, TaskState::kRouted);
  ASSERT_TRUE(t.decision.has_value());
  EXPECT_EQ(t.decision->chosen, "b");
  EXPECT_FALSE(store_->GetTask("b2-unknown", &t).ok());
}

// Admission: a new task stored with its decision and its first attempt in one write, each
// task of a batch with its own status; and an outcome that ends the task in one write.
TEST_P(StoreTest, AdmittedTasksLandWholeOrNotAtAllAndOutcomesCanEndThem) {
  NewTask("dup", 1);  // a second task with this id must fail alone
  Task queued, routed, running, dup;
  queued.id = "q1", routed.id = "r1", running.id = "s1", dup.id = "dup";
  for (Task* t : {&queued, &routed, &running, &dup}) {
    t->text = "task " + t->id;
    t->created_at = t->updated_at = 10;
  }
  Decision d = NewDecision("security", 0.7);
  std::vector<Status> st;
  store_->Admit({{&queued, nullptr, ""},
                 {&routed, &d, ""},
                 {&dup, &d, "security"},
                 {&running, &d, "security"}},
                &st);
  ASSERT_EQ(st.size(), 4u);
  EXPECT_TRUE(st[0].ok() && st[1].ok() && st[3].ok());
  EXPECT_FALSE(st[2].ok()) << "the duplicate id is refused";
  Task t;
  ASSERT_TRUE(store_->GetTask("q1", &t).ok());
  EXPECT_EQ(t.state, TaskState::kQueued);
  EXPECT_FALSE(t.decision.has_value());
  ASSERT_TRUE(store_->GetTask("r1", &t).ok());
  EXPECT_EQ(t.state, TaskState::kRouted);
  ASSERT_TRUE(t.decision.has_value());
  EXPECT_TRUE(t.attempts.empty());
  ASSERT_TRUE(store_->GetTask("s1", &t).ok());
  EXPECT_EQ(t.state, TaskState::kRunning);
  ASSERT_EQ(t.attempts.size(), 1u);
  EXPECT_EQ(t.attempts[0].expert, "security");
  EXPECT_FALSE(t.attempts[0].outcome.has_value());
  ASSERT_TRUE(store_->GetTask("dup", &t).ok());
  EXPECT_TRUE(t.attempts.empty()) << "nothing of the refused admission was written";
  EXPECT_EQ(t.state, TaskState::kQueued);

  // The outcome and the task's end together: the attempt's expert is the one named.
  Outcome o;
  o.kind = OutcomeKind::kSuccess;
  o.quality = 1;
  ASSERT_TRUE(store_->FinishAttempt("s1", 1, o, 12, TaskState::kSucceeded).ok());
  ASSERT_TRUE(store_->GetTask("s1", &t).ok());
  EXPECT_EQ(t.state, TaskState::kSucceeded);
  EXPECT_EQ(t.expert, "security");
  EXPECT_DOUBLE_EQ(t.updated_at, 12);
  ASSERT_TRUE(t.attempts[0].outcome.has_value());
  EXPECT_EQ(t.attempts[0].outcome->kind, OutcomeKind::kSuccess);
  // An attempt recorded but never begun (cortexd stopped first) is taken back: the task is
  // routed again, with no attempt; only an open attempt can be taken back.
  Task again;
  again.id = "s2", again.text = "again", again.created_at = again.updated_at = 10;
  store_->Admit({{&again, &d, "security"}}, &st);
  ASSERT_TRUE(st[0].ok()) << st[0].ToString();
  ASSERT_TRUE(store_->UndoStart("s2", 1).ok());
  ASSERT_TRUE(store_->GetTask("s2", &t).ok());
  EXPECT_EQ(t.state, TaskState::kRouted);
  EXPECT_TRUE(t.attempts.empty());
  EXPECT_EQ(store_->UndoStart("s2", 1).code(), Status::Code::kNotFound);
  EXPECT_EQ(store_->UndoStart("s1", 1).code(), Status::Code::kNotFound) << "it has ended";
  // Without an end it stays as it is; an attempt that does not exist changes nothing.
  EXPECT_EQ(store_->FinishAttempt("r1", 1, o, 13, TaskState::kSucceeded).code(),
            Status::Code::kNotFound);
  ASSERT_TRUE(store_->GetTask("r1", &t).ok());
  EXPECT_EQ(t.state, TaskState::kRouted);

  // An admission that need not wait for the disk (its submitter waits for the end) lands
  // as any other, beside a durable one in the same batch; Sync puts every commit so far
  // on the disk, and is cheap once they are.
  Task lazy, eager;
  lazy.id = "l1", lazy.text = "lazy", lazy.created_at = lazy.updated_at = 20;
  eager.id = "e1", eager.text = "eager", eager.created_at = eager.updated_at = 20;
  store_->Admit({{&lazy, &d, "security", /*durable=*/false}, {&eager, &d, "", true}}, &st);
  ASSERT_TRUE(st[0].ok() && st[1].ok()) << st[0].ToString() << st[1].ToString();
  EXPECT_TRUE(store_->Sync().ok());
  EXPECT_TRUE(store_->Sync().ok());
  ASSERT_TRUE(store_->GetTask("l1", &t).ok());
  EXPECT_EQ(t.state, TaskState::kRunning);
  ASSERT_EQ(t.attempts.size(), 1u);
  ASSERT_TRUE(store_->GetTask("e1", &t).ok());
  EXPECT_EQ(t.state, TaskState::kRouted);
}

INSTANTIATE_TEST_SUITE_P(Backends, StoreTest, ::testing::Values(":memory:", "file", "postgresql"),
                         [](const auto& info) {
                           return info.param == ":memory:" ? "Memory"
                                  : info.param == "file"   ? "WalFile"
                                                           : "PostgreSQL";
                         });

// What only the PostgreSQL store has: a database that is not ours, or newer, is refused
// and left as it was; a password is never shown.
class PostgresStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    pg_ = test::PgServer::Get(&why);
    if (!pg_) GTEST_SKIP() << "no PostgreSQL server: " << why;
    url_ = pg_->NewDatabase();
    ASSERT_FALSE(url_.empty());
  }
  // Runs `sql` on the test's database, outside any store.
  void Sql(const std::string& sql) {
    PGconn* c = PQconnectdb(url_.c_str());
    PGresult* r = PQexec(c, sql.c_str());
    EXPECT_TRUE(PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK)
        << PQresultErrorMessage(r);
    PQclear(r);
    PQfinish(c);
  }
  test::PgServer* pg_ = nullptr;
  std::string url_;
};

TEST_F(PostgresStoreTest, ForeignDatabaseIsRefusedAndUntouched) {
  Sql("CREATE TABLE invoices(id int)");
  auto s = OpenStore(url_);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), Status::Code::kCorruption);
  EXPECT_NE(s.status().message().find("another application's tables"), std::string::npos)
      << s.status().ToString();
  PGconn* c = PQconnectdb(url_.c_str());
  PGresult* r = PQexec(c, "SELECT count(*) FROM pg_tables WHERE schemaname='public'");
  EXPECT_STREQ(PQgetvalue(r, 0, 0), "1") << "nothing was created beside it";
  PQclear(r);
  PQfinish(c);
  // A view is another application's too.
  url_ = pg_->NewDatabase();
  Sql("CREATE VIEW answers AS SELECT 42 AS answer");
  auto v = OpenStore(url_);
  ASSERT_FALSE(v.ok());
  EXPECT_NE(v.status().message().find("tables or views"), std::string::npos)
      << v.status().ToString();
}

TEST_F(PostgresStoreTest, NewerSchemaIsRefused) {
  { ASSERT_TRUE(OpenStore(url_).ok()); }
  Sql("UPDATE cortex_schema SET version=99");
  auto s = OpenStore(url_);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("newer than this cortexd"), std::string::npos)
      << s.status().ToString();
}

TEST_F(PostgresStoreTest, APasswordIsNeverShown) {
  EXPECT_EQ(RedactUrl("postgresql://cortex:s3cret@db.example:5432/cortex?sslmode=require"),
            "postgresql://cortex:***@db.example:5432/cortex?sslmode=require");
  EXPECT_EQ(RedactUrl("postgresql://db.example/cortex?user=c&password=s3cret&x=1"),
            "postgresql://db.example/cortex?user=c&password=***&x=1");
  auto s = OpenStore(url_);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ((*s)->Path(), url_);  // no password in it: shown as it is
  auto bad =
      OpenStore("postgresql://cortex:s3cret@/nosuchdb?host=" + url_.substr(url_.find("host=") + 5));
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().message().find("s3cret"), std::string::npos) << bad.status().ToString();
}

// Text PostgreSQL cannot hold (a NUL, bytes that are not UTF-8) is stored made valid
// rather than failing the write: an expert's output is whatever it printed.
TEST_F(PostgresStoreTest, OutputThatIsNotUtf8IsKeptReadable) {
  auto s = OpenStore(url_);
  ASSERT_TRUE(s.ok());
  Task t;
  t.id = "u1";
  t.text = "x";
  t.created_at = 1;
  ASSERT_TRUE((*s)->InsertTask(t).ok());
  ASSERT_TRUE((*s)->StartAttempt("u1", 1, "a", 1).ok());
  Outcome o;
  o.kind = OutcomeKind::kSuccess;
  o.output = std::string("ok\xff\0end", 7);
  ASSERT_TRUE((*s)->FinishAttempt("u1", 1, o, 2, TaskState::kSucceeded).ok());
  Task back;
  ASSERT_TRUE((*s)->GetTask("u1", &back).ok());
  EXPECT_EQ(back.attempts[0].outcome->output, "ok??end");
}

// Several nodes write to one database: a learning event is numbered as it commits, so
// one committed late is never numbered below one a reader has already seen. Another node
// (a raw connection, doing what the store does last before COMMIT) has numbered its event
// and not committed yet: a second node's event waits for it, a reader sees neither before,
// and both after, in commit order. (With a sequence the second would commit first with
// N+1, a reader would resume after N+1, and the first, N, would never be read.)
TEST_F(PostgresStoreTest, LearningEventsAreNumberedInCommitOrderAcrossNodes) {
  auto a = OpenStore(url_), b = OpenStore(url_);
  ASSERT_TRUE(a.ok() && b.ok());
  Store& s1 = **a;
  Store& s2 = **b;
  for (const char* id : {"held", "late"}) {
    Task t;
    t.id = id;
    t.text = id;
    t.created_at = 1;
    ASSERT_TRUE(s1.InsertTask(t).ok());
    ASSERT_TRUE(s1.StartAttempt(id, 1, "x", 2).ok());
  }
  auto events = [&](Store& s, long after) {
    std::vector<LoggedOutcome> out;
    EXPECT_TRUE(s.ForEachLearnEvent(after, [&](const LoggedOutcome& o) {
                   out.push_back(o);
                   return true;
                 }).ok());
    return out;
  };

  PGconn* other = PQconnectdb(url_.c_str());
  ASSERT_EQ(PQstatus(other), CONNECTION_OK);
  auto run = [&](const char* sql) {
    PGresult* r = PQexec(other, sql);
    const bool ok = PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK;
    EXPECT_TRUE(ok) << sql << ": " << PQresultErrorMessage(r);
    PQclear(r);
    return ok;
  };
  ASSERT_TRUE(run("BEGIN"));
  ASSERT_TRUE(
      run("UPDATE attempts SET outcome='success',quality=1,finished_at=3 "
          "WHERE task_id='held' AND n=1"));
  ASSERT_TRUE(run("INSERT INTO learn(task_id,n,feedback,reward,time) VALUES('held',1,false,1,3)"));
  ASSERT_TRUE(
      run("WITH v AS (UPDATE learn_counter SET v=v+1 RETURNING v) "
          "UPDATE learn SET seq=(SELECT v FROM v) WHERE seq IS NULL"));

  Outcome ok;
  ok.kind = OutcomeKind::kSuccess;
  ok.quality = 0.5;
  std::atomic<bool> done{false};
  Status late;
  std::thread node2([&] {
    late = s2.FinishAttempt("late", 1, ok, 4, TaskState::kSucceeded);
    done = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  EXPECT_FALSE(done) << "the second node's event committed before the first one's";
  EXPECT_TRUE(events(s1, 0).empty());
  EXPECT_TRUE(run("COMMIT"));
  node2.join();
  PQfinish(other);
  ASSERT_TRUE(late.ok()) << late.ToString();

  std::vector<LoggedOutcome> seen = events(s1, 0);
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_EQ(seen[0].task_id, "held");
  EXPECT_EQ(seen[1].task_id, "late");
  EXPECT_EQ(seen[1].seq, seen[0].seq + 1);
  EXPECT_DOUBLE_EQ(seen[1].reward, 0.5);
}

// The same under load, without forcing an order: two stores (nodes) finish attempts and
// take verdicts at once while a reader resumes after the last seq it saw, as online
// learning does. It must end up with every event, each once, in increasing seq.
TEST_F(PostgresStoreTest, AReaderResumingAfterItsLastSeqMissesNoEventOfTwoNodes) {
  auto a = OpenStore(url_), b = OpenStore(url_);
  ASSERT_TRUE(a.ok() && b.ok());
  Store* stores[2] = {a->get(), b->get()};
  constexpr int kEach = 60;
  for (int k = 0; k < 2; ++k)
    for (int i = 0; i < kEach; ++i) {
      Task t;
      t.id = "n" + std::to_string(k) + "-" + std::to_string(i);
      t.text = t.id;
      t.created_at = 1;
      ASSERT_TRUE(stores[k]->InsertTask(t).ok());
      ASSERT_TRUE(stores[k]->StartAttempt(t.id, 1, "x", 2).ok());
    }
  std::atomic<int> writing{2};
  std::vector<std::thread> nodes;
  for (int k = 0; k < 2; ++k)
    nodes.emplace_back([&, k] {
      Outcome ok;
      ok.kind = OutcomeKind::kSuccess;
      ok.quality = 1;
      for (int i = 0; i < kEach; ++i) {
        const std::string id = "n" + std::to_string(k) + "-" + std::to_string(i);
        EXPECT_TRUE(stores[k]->FinishAttempt(id, 1, ok, 3, TaskState::kSucceeded).ok());
        // A verdict, on the other node, on a task this one finished earlier.
        FeedbackResult r;
        if (i % 3 == 2)
          EXPECT_TRUE(stores[1 - k]
                          ->AddFeedback("n" + std::to_string(k) + "-" + std::to_string(i - 1),
                                        {4, 0.0, "", "p" + std::to_string(k)}, 0, &r)
                          .ok());
      }
      --writing;
    });
  std::vector<long> read;  // what the reader saw, resuming after the last seq each time
  auto poll = [&] {
    long after = read.empty() ? 0 : read.back();
    EXPECT_TRUE(stores[0]
                    ->ForEachLearnEvent(after,
                                        [&](const LoggedOutcome& o) {
                                          read.push_back(o.seq);
                                          return true;
                                        })
                    .ok());
  };
  while (writing > 0) poll();
  for (auto& t : nodes) t.join();
  poll();
  std::vector<long> all;
  ASSERT_TRUE(stores[1]
                  ->ForEachLearnEvent(0,
                                      [&](const LoggedOutcome& o) {
                                        all.push_back(o.seq);
                                        return true;
                                      })
                  .ok());
  EXPECT_EQ(all.size(), static_cast<size_t>(2 * kEach + 2 * (kEach / 3)));
  EXPECT_EQ(read, all) << "the reader skipped or repeated an event";
  ASSERT_FALSE(all.empty());
  EXPECT_EQ(all.back(), static_cast<long>(all.size()));  // and with no gap
}

// A database of schema v4 (the cluster's, before the learning log) is migrated: its
// training attempts become learning events in their old order (attempts.seq), a model's
// trained_through is renumbered into the new sequence, the live model gets an activation,
// and new events are numbered after the migrated ones.
TEST_F(PostgresStoreTest, AV4DatabaseIsMigratedToTheLearningLog) {
  { ASSERT_TRUE(OpenStore(url_).ok()); }
  // Back to v4: v5 only added these.
  Sql("DROP TABLE learn, learn_counter, activations, checkpoints;"
      "ALTER TABLE feedback DROP COLUMN \"by\", DROP COLUMN n;"
      "ALTER TABLE decisions DROP COLUMN model_step, DROP COLUMN model_live;"
      "UPDATE cortex_schema SET version=4");
  // Rows as v4 wrote them; attempts.seq is their order, not the tasks'.
  Sql("INSERT INTO tasks(id,text,tags,state,created_at,updated_at) VALUES"
      "('t1','one','{}','succeeded',1,1),('t2','two','{}','failed',2,2),"
      "('t3','three','{}','running',3,3);"
      "INSERT INTO decisions(task_id,time,model_version,chosen,chosen_confidence,propensity,"
      "explored,forced,candidates) VALUES('t1',1,'m','a',0.5,0.25,false,false,"
      "'[{\"expert\":\"a\",\"rule_score\":0.5}]');"
      "INSERT INTO attempts(seq,task_id,n,expert,started_at,finished_at,outcome,quality) VALUES"
      "(10,'t2',1,'b',2,2.5,'crash',0),"
      "(11,'t1',1,'a',1,1.5,'failure',0.7),"
      "(12,'t2',2,'c',2.6,2.8,'interrupted',0),"
      "(13,'t1',2,'b',1.6,1.9,'success',0.8),"
      "(14,'t2',3,'a',2.9,3.1,'success',0.6),"
      "(15,'t3',1,'a',3,NULL,NULL,NULL);"
      "INSERT INTO feedback(task_id,time,quality,note) VALUES('t1',5,0.1,'old');"
      "INSERT INTO models(version,created,status,live,trained_through,metrics,weights) VALUES"
      "(1,7,'promoted',false,11,'{}','\\x01'),(2,8,'promoted',true,13,'{}','\\x02')");
  auto s = OpenStore(url_);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  Store& st = **s;
  EXPECT_EQ(st.SchemaVersion(), 5);
  std::vector<LoggedOutcome> ev;
  ASSERT_TRUE(st.ForEachLearnEvent(0, [&](const LoggedOutcome& o) {
                  ev.push_back(o);
                  return true;
                }).ok());
  ASSERT_EQ(ev.size(), 3u);  // the crash, the interruption and the open attempt are none
  EXPECT_EQ(ev[0].seq, 1);
  EXPECT_EQ(ev[0].task_id, "t1");
  EXPECT_EQ(ev[0].attempt, 1);
  EXPECT_DOUBLE_EQ(ev[0].reward, 0.0);  // a failure's quality is no reward
  EXPECT_DOUBLE_EQ(ev[0].propensity, 0.25);
  EXPECT_DOUBLE_EQ(ev[0].prior, 0.0);
  EXPECT_EQ(ev[1].seq, 2);
  EXPECT_EQ(ev[1].task_id, "t1");
  EXPECT_DOUBLE_EQ(ev[1].reward, 0.8);
  EXPECT_EQ(ev[2].seq, 3);
  EXPECT_EQ(ev[2].task_id, "t2");
  EXPECT_EQ(ev[2].attempt, 3);
  EXPECT_DOUBLE_EQ(ev[2].reward, 0.6);
  EXPECT_DOUBLE_EQ(ev[2].propensity, 1.0);  // no decision: a later attempt's
  std::vector<ModelRecord> ms;
  ASSERT_TRUE(st.ListModels(&ms).ok());
  ASSERT_EQ(ms.size(), 2u);
  EXPECT_EQ(ms[0].trained_through, 1);  // through attempt seq 11: the first event
  EXPECT_EQ(ms[1].trained_through, 2);  // through 13
  Activation act;
  ASSERT_TRUE(st.LiveActivation(&act).ok());
  EXPECT_EQ(act.version, 2);
  EXPECT_EQ(act.after_seq, 2);
  EXPECT_EQ(act.reason, "migrated");
  Task t;
  ASSERT_TRUE(st.GetTask("t1", &t).ok());
  ASSERT_EQ(t.feedback.size(), 1u);
  EXPECT_EQ(t.feedback[0].by, "");
  EXPECT_EQ(t.feedback[0].attempt, 0);
  ASSERT_TRUE(t.decision.has_value());
  EXPECT_EQ(t.decision->model_step, -1);

  Outcome ok;
  ok.kind = OutcomeKind::kSuccess;
  ok.quality = 1;
  ASSERT_TRUE(st.FinishAttempt("t3", 1, ok, 4, TaskState::kSucceeded).ok());
  long any = 0, outcome = 0;
  ASSERT_TRUE(st.NewestLearnSeq(&any, &outcome).ok());
  EXPECT_EQ(any, 4);
  EXPECT_EQ(outcome, 4);
}

TEST(StoreFileTest, UsesWalAndReopensWithData) {
  test::TempDir dir;
  std::string path = dir / "c.db";
  {
    auto s = OpenStore(path);
    ASSERT_TRUE(s.ok());
    Task t;
    t.id = "x";
    t.text = "persist me";
    ASSERT_TRUE(s.value()->InsertTask(t).ok());
  }
  auto s = OpenStore(path);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  Task t;
  ASSERT_TRUE(s.value()->GetTask("x", &t).ok());
  EXPECT_EQ(t.text, "persist me");
  sqlite3* db;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  sqlite3_stmt* st;
  sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &st, nullptr);
  ASSERT_EQ(sqlite3_step(st), SQLITE_ROW);
  EXPECT_STREQ(reinterpret_cast<const char*>(sqlite3_column_text(st, 0)), "wal");
  sqlite3_finalize(st);
  sqlite3_close(db);
}

TEST(StoreFileTest, ForeignDatabaseIsRefusedAndUntouched) {
  test::TempDir dir;
  std::string path = dir / "other.db";
  sqlite3* db;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, "CREATE TABLE invoices(id INTEGER); INSERT INTO invoices VALUES(7);",
                         nullptr, nullptr, nullptr),
            SQLITE_OK);
  sqlite3_close(db);
  std::string before = test::ReadFile(path);
  auto s = OpenStore(path);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), Status::Code::kCorruption);
  EXPECT_NE(s.status().message().find("not a Cortex store"), std::string::npos)
      << s.status().message();
  EXPECT_EQ(test::ReadFile(path), before);
}

TEST(StoreFileTest, GarbageFileIsRefusedAndUntouched) {
  test::TempDir dir;
  std::string path = dir / "junk.db";
  std::string junk(8192, 'x');
  test::WriteFile(path, junk);
  auto s = OpenStore(path);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("not a Cortex store"), std::string::npos)
      << s.status().message();
  EXPECT_EQ(test::ReadFile(path), junk);
}

TEST(StoreFileTest, DamagedStoreIsRefusedAndUntouched) {
  test::TempDir dir;
  std::string path = dir / "cortex.db";
  {
    auto s = OpenStore(path);
    ASSERT_TRUE(s.ok());
    for (int i = 0; i < 400; ++i) {
      Task t;
      t.id = "t" + std::to_string(i);
      t.text = std::string(200, 'a' + i % 26);
      ASSERT_TRUE((*s)->InsertTask(t).ok());
    }
  }
  std::string bytes = test::ReadFile(path);
  ASSERT_GT(bytes.size(), 16u * 4096);
  // Garbage over pages in the middle; the header (and so the application id) survives.
  for (size_t i = 8 * 4096; i < 12 * 4096; ++i) bytes[i] = static_cast<char>(i * 7);
  test::WriteFile(path, bytes);
  auto s = OpenStore(path);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), Status::Code::kCorruption);
  EXPECT_NE(s.status().message().find("the store is damaged"), std::string::npos)
      << s.status().message();
  EXPECT_EQ(test::ReadFile(path), bytes) << "never written";
}

TEST(StoreFileTest, NewerSchemaIsRefused) {
  test::TempDir dir;
  std::string path = dir / "new.db";
  { ASSERT_TRUE(OpenStore(path).ok()); }
  sqlite3* db;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, "PRAGMA user_version=99", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(db);
  auto s = OpenStore(path);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("newer than this cortexd"), std::string::npos);
}

}  // namespace
}  // namespace cortex
