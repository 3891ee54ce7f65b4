// PostgreSQL backend of Store (store.url): the same tables and promises as the SQLite
// one. Writes go through one connection with group commit (leveldb's writer queue, as in
// sqlite_store.cc): each group is one transaction, each write in it returns only after
// the COMMIT, which with synchronous_commit=on has reached the server's disk. Reads have
// a connection of their own; a report opens another and can be cancelled. Every
// statement is prepared once and binds its parameters; no SQL is built from input.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>

#include "backends.h"
#include "cortex/env.h"
#include "cortex/group_queue.h"
#include "cortex/log.h"
#include "cortex/store.h"
#include "cortex/store_url.h"
#include "pg.h"
#include "rows.h"

namespace cortex {
namespace {

using json = nlohmann::json;
using pg::Param;
using store::CandidatesJson;
using store::ParseTags;
using store::TagsJson;

// An advisory lock key ('CRTX' and a number): nodes that start at once migrate once.
constexpr long kMigrateLock = 0x4352545801L;
// Changes of the live model (and pruning) one at a time across nodes: two rollbacks at once
// would each clear the live flag they saw and leave two versions live, and activations'
// ids are their commit order, so the newest id is the live one.
constexpr long kLiveLock = 0x4352545804L;
// With the hash of a person's name (the two-key form, kept apart from the one-key form):
// one verdict at a time per person, so that two nodes cannot both pass the hourly bound.
constexpr int kVerdictLock = 0x43525404;

// Each entry moves the schema one version up; never edit a released one, append. v1-v3
// match SQLite's (sqlite_store.cc): the same tables at the same number.
const char* const kMigrations[] = {
    // v1
    R"sql(
CREATE TABLE cortex_schema(application text NOT NULL, version integer NOT NULL);
INSERT INTO cortex_schema VALUES('cortex', 0);
CREATE TABLE tasks(
  seq bigserial UNIQUE,
  id text COLLATE "C" PRIMARY KEY,
  text text NOT NULL,
  tags text NOT NULL,
  state text NOT NULL,
  created_at double precision NOT NULL,
  updated_at double precision NOT NULL,
  expert text,
  feedback_quality double precision
);
CREATE INDEX tasks_created ON tasks(created_at);
CREATE INDEX tasks_state ON tasks(state);
CREATE TABLE decisions(
  task_id text COLLATE "C" PRIMARY KEY REFERENCES tasks(id),
  time double precision NOT NULL,
  model_version text NOT NULL,
  chosen text NOT NULL,
  chosen_confidence double precision NOT NULL,
  propensity double precision NOT NULL,
  explored boolean NOT NULL,
  forced boolean NOT NULL,
  candidates jsonb NOT NULL
);
CREATE INDEX decisions_chosen ON decisions(chosen);
CREATE INDEX decisions_time ON decisions(time);
CREATE TABLE attempts(
  seq bigserial UNIQUE,
  task_id text COLLATE "C" NOT NULL REFERENCES tasks(id),
  n integer NOT NULL,
  expert text NOT NULL,
  started_at double precision NOT NULL,
  finished_at double precision,
  outcome text,
  quality double precision,
  duration_s double precision,
  output text,
  error text,
  PRIMARY KEY(task_id, n)
);
CREATE INDEX attempts_expert ON attempts(expert);
CREATE TABLE feedback(
  id bigserial PRIMARY KEY,
  task_id text COLLATE "C" NOT NULL REFERENCES tasks(id),
  time double precision NOT NULL,
  quality double precision NOT NULL,
  note text NOT NULL
);
CREATE INDEX feedback_task ON feedback(task_id);
CREATE TABLE expert_events(
  id bigserial PRIMARY KEY,
  time double precision NOT NULL,
  expert text NOT NULL,
  file text NOT NULL,
  event text NOT NULL,
  detail text NOT NULL
);
)sql",
    // v2: the learning router. Decisions keep their greedy pick (for off-policy
    // evaluation); every trained model version is kept with its metrics and weights.
    R"sql(
ALTER TABLE decisions ADD COLUMN greedy text;
CREATE TABLE models(
  version integer PRIMARY KEY,
  created double precision NOT NULL,
  status text NOT NULL,
  live boolean NOT NULL DEFAULT false,
  trained_through bigint NOT NULL,
  metrics text NOT NULL,
  weights bytea NOT NULL
);
)sql",
    // v3: the poison-task guard. `routing` is set while a task is being routed; `deaths`
    // counts the starts that found it routing or running; `error` says why a task ended
    // without an attempt that says so.
    R"sql(
ALTER TABLE tasks ADD COLUMN routing boolean NOT NULL DEFAULT false;
ALTER TABLE tasks ADD COLUMN deaths integer NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN error text;
)sql",
    // v4 (PostgreSQL only): the cluster. Each task is a node's (`node`) or, with none, in
    // the shared queue for the expert its next attempt needs (`want`; none: to be
    // routed); `nodes` holds each node's heartbeat and the experts it hosts.
    R"sql(
ALTER TABLE tasks ADD COLUMN node text;
ALTER TABLE tasks ADD COLUMN want text;
CREATE INDEX tasks_shared ON tasks(want, created_at) WHERE node IS NULL AND state IN ('queued','routed');
CREATE INDEX tasks_node ON tasks(node) WHERE state IN ('queued','routed','running');
CREATE TABLE nodes(
  name text PRIMARY KEY,
  socket text NOT NULL,
  pid integer NOT NULL,
  started_at double precision NOT NULL,
  heartbeat_at double precision NOT NULL,
  lost boolean NOT NULL DEFAULT false,
  trainer boolean NOT NULL DEFAULT false,
  experts jsonb NOT NULL
);
)sql",
    // v5: learning users can steer and reproduce (SQLite's v4). `learn` numbers every
    // learning event (a finished training attempt, a verdict that changes a reward) as it
    // commits: a transaction inserts its events unnumbered (seq NULL, `id` keeps their
    // order) and numbers them from `learn_counter` just before its COMMIT (see
    // NumberLearnEvents). `activations` says which version went live from which event on;
    // `checkpoints` keep an activation's weights every so many steps; a decision names the
    // activation and step that scored it; a verdict names who gave it and which attempt it
    // judged. Existing outcomes keep their order (attempts.seq), and a model's
    // trained_through is renumbered into the new sequence.
    R"sql(
ALTER TABLE feedback ADD COLUMN "by" text NOT NULL DEFAULT '';
ALTER TABLE feedback ADD COLUMN n integer NOT NULL DEFAULT 0;
CREATE INDEX feedback_by ON feedback("by", time);
ALTER TABLE decisions ADD COLUMN model_step bigint;
ALTER TABLE decisions ADD COLUMN model_live bigint;
CREATE TABLE learn(
  id bigserial PRIMARY KEY,
  seq bigint UNIQUE,
  task_id text COLLATE "C" NOT NULL,
  n integer NOT NULL,
  feedback boolean NOT NULL DEFAULT false,
  reward double precision NOT NULL,
  time double precision NOT NULL
);
CREATE INDEX learn_attempt ON learn(task_id, n);
CREATE INDEX learn_unnumbered ON learn(id) WHERE seq IS NULL;
INSERT INTO learn(seq,task_id,n,feedback,reward,time)
  SELECT row_number() OVER (ORDER BY seq),task_id,n,false,
    CASE WHEN outcome='success' THEN COALESCE(quality,0) ELSE 0 END,COALESCE(finished_at,0)
  FROM attempts WHERE outcome IS NOT NULL AND outcome NOT IN ('interrupted','crash');
CREATE TABLE learn_counter(
  one boolean PRIMARY KEY DEFAULT true CHECK(one),
  v bigint NOT NULL
);
INSERT INTO learn_counter(v) SELECT COALESCE(max(seq),0) FROM learn;
UPDATE models SET trained_through=(SELECT count(*) FROM attempts a WHERE a.seq<=models.trained_through
  AND a.outcome IS NOT NULL AND a.outcome NOT IN ('interrupted','crash'));
CREATE TABLE activations(
  id bigserial PRIMARY KEY,
  version integer NOT NULL,
  after_seq bigint NOT NULL,
  time double precision NOT NULL,
  reason text NOT NULL
);
INSERT INTO activations(version,after_seq,time,reason)
  SELECT version,trained_through,created,'migrated' FROM models WHERE live;
CREATE TABLE checkpoints(
  activation bigint NOT NULL,
  step bigint NOT NULL,
  seq bigint NOT NULL,
  rng bigint NOT NULL,
  weights bytea NOT NULL,
  PRIMARY KEY(activation, step)
);
)sql",
};
constexpr int kSchemaVersion = sizeof(kMigrations) / sizeof(kMigrations[0]);

// Learning events with $1 < seq <= $2, at most $3, in seq order: seq, task, created, text,
// tags, expert, attempt, reward, feedback, propensity, forced, candidates, greedy, explored,
// chosen. REWARD is the event's own, or the attempt's as of now.
#define CORTEX_PG_LEARN_SQL(REWARD, WHERE)                                                        \
  "SELECT l.seq,l.task_id,t.created_at,t.text,t.tags,a.expert,l.n," REWARD                        \
  ",l.feedback,COALESCE(d.propensity,1),COALESCE(d.forced,false),"                                \
  "COALESCE(d.candidates,'[]'::jsonb),d.greedy,COALESCE(d.explored,false),COALESCE(d.chosen,'') " \
  "FROM learn l JOIN tasks t ON t.id=l.task_id JOIN attempts a ON a.task_id=l.task_id AND "       \
  "a.n=l.n LEFT JOIN decisions d ON d.task_id=l.task_id WHERE l.seq>$1 AND l.seq<=$2" WHERE       \
  " ORDER BY l.seq LIMIT $3"
const char* const kLearnEventsSql = CORTEX_PG_LEARN_SQL("l.reward", "");
// A retrain's outcomes: each training attempt once, with the reward its latest verdict made.
const char* const kOutcomesSql = CORTEX_PG_LEARN_SQL(
    "COALESCE((SELECT f.reward FROM learn f WHERE f.task_id=l.task_id AND "
    "f.n=l.n AND f.feedback ORDER BY f.seq DESC LIMIT 1),l.reward)",
    " AND NOT l.feedback");
constexpr long kLearnPage = 1024;  // read in pages: a long history is never held at once

LoggedOutcome LearnRow(const pg::Result& s, int i) {
  LoggedOutcome o;
  o.seq = s.Long(i, 0);
  o.task_id = s.Text(i, 1);
  o.time = s.Double(i, 2);
  o.text = s.Text(i, 3);
  o.tags = ParseTags(s.Text(i, 4));
  o.expert = s.Text(i, 5);
  o.attempt = static_cast<int>(s.Long(i, 6));
  o.reward = s.Double(i, 7);
  o.feedback = s.Bool(i, 8);
  o.propensity = o.attempt == 1 ? s.Double(i, 9) : 1.0;
  o.forced = s.Bool(i, 10);
  store::ReadLoggedCandidates(json::parse(s.Text(i, 11), nullptr, false), &o);
  o.greedy = s.Null(i, 12) ? (s.Bool(i, 13) ? "" : s.Text(i, 14)) : s.Text(i, 12);
  return o;
}

Activation ActivationRow(const pg::Result& s) {
  return {s.Long(0, 0), static_cast<int>(s.Long(0, 1)), s.Long(0, 2), s.Double(0, 3), s.Text(0, 4)};
}

// A model as listed (no weights) from a row of
// "version,created,status,live,trained_through,metrics,octet_length(weights)".
ModelRecord ListedModel(const pg::Result& r, int i) {
  ModelRecord m;
  m.version = static_cast<int>(r.Long(i, 0));
  m.created = r.Double(i, 1);
  m.status = r.Text(i, 2);
  m.live = r.Bool(i, 3);
  m.trained_through = r.Long(i, 4);
  m.metrics = r.Text(i, 5);
  m.weights_bytes = r.Long(i, 6);
  return m;
}

class PgStore : public Store {
 public:
  explicit PgStore(std::string url) : url_(std::move(url)), shown_(RedactUrl(url_)) {}
  ~PgStore() override {
    StopReports();
    std::lock_guard<std::mutex> wait(report_mu_);  // a report running ends first
  }

  Status Open() {
    CORTEX_RETURN_IF_ERROR(write_.Connect(url_, "writer", /*short_transactions=*/true));
    CORTEX_RETURN_IF_ERROR(Migrate());
    return read_.Connect(url_, "reader");
  }

  Status InsertTask(const Task& t) override {
    const std::string tags = TagsJson(t.tags).dump();
    return Commit([&] { return WriteTask(t, tags, t.state, t.created_at); });
  }

  // (`want`: the expert its first attempt needs, if it is routed.)
  Status WriteTask(const Task& t, const std::string& tags, TaskState state, double updated_at,
                   const std::string& want = "") {
    return Done(
        write_.Query("INSERT INTO tasks(id,text,tags,state,created_at,updated_at,node,"
                     "want) VALUES($1,$2,$3,$4,$5,$6,NULLIF($7,''),NULLIF($8,''))",
                     {t.id, t.text, tags, ToString(state), t.created_at, updated_at, node_, want}),
        "insert task " + t.id);
  }

  void Admit(const std::vector<Admission>& batch, std::vector<Status>* out) override {
    std::vector<std::string> tags, cands;  // serialized before taking the writer's turn
    for (const Admission& a : batch) {
      tags.push_back(TagsJson(a.task->tags).dump());
      cands.push_back(a.decision ? CandidatesJson(*a.decision).dump() : std::string());
    }
    // Every commit here is durable: an admission that need not wait for the disk gets
    // more than it asked for.
    std::vector<std::function<Status()>> writes;
    for (size_t i = 0; i < batch.size(); ++i) {
      writes.push_back([&, i] {
        const Admission& a = batch[i];
        if (!a.decision) return WriteTask(*a.task, tags[i], a.task->state, a.task->created_at);
        const TaskState state = a.started.empty() ? TaskState::kRouted : TaskState::kRunning;
        CORTEX_RETURN_IF_ERROR(
            WriteTask(*a.task, tags[i], state, a.decision->time, a.decision->chosen));
        CORTEX_RETURN_IF_ERROR(InsertDecision(a.task->id, *a.decision, cands[i]));
        if (a.started.empty()) return Status::OK();
        return InsertAttempt(a.task->id, 1, a.started, a.decision->time);
      });
    }
    *out = CommitEach(writes);
  }

  void RecordDecisions(const std::vector<std::pair<std::string, const Decision*>>& batch,
                       std::vector<Status>* out) override {
    std::vector<std::string> cands;
    for (const auto& [id, d] : batch) cands.push_back(CandidatesJson(*d).dump());
    std::vector<std::function<Status()>> writes;
    for (size_t i = 0; i < batch.size(); ++i)
      writes.push_back([&, i] {
        const std::string& id = batch[i].first;
        const Decision& d = *batch[i].second;
        CORTEX_RETURN_IF_ERROR(InsertDecision(id, d, cands[i]));
        // (`want`: whom its first attempt needs, should the task reach the shared queue)
        return Changed(write_.Query("UPDATE tasks SET state='routed',updated_at=$1,routing=false,"
                                    "want=$2 WHERE id=$3",
                                    {d.time, d.chosen, id}),
                       "update task state", "task with id '" + id + "'");
      });
    *out = CommitEach(writes);
  }

  Status InsertDecision(const std::string& id, const Decision& d, const std::string& cands) {
    const Candidate* chosen = d.Find(d.chosen);
    return Done(
        write_.Query(
            "INSERT INTO decisions(task_id,time,model_version,chosen,chosen_confidence,"
            "propensity,explored,forced,candidates,greedy,model_step,model_live) "
            "VALUES($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,"
            // (no step recorded: NULL, read back as -1)
            "CASE WHEN $11::bigint>=0 THEN $11::bigint END,"
            "CASE WHEN $11::bigint>=0 THEN $12::bigint END) "
            "ON CONFLICT(task_id) DO UPDATE SET time=EXCLUDED.time,"
            "model_version=EXCLUDED.model_version,chosen=EXCLUDED.chosen,"
            "chosen_confidence=EXCLUDED.chosen_confidence,propensity=EXCLUDED.propensity,"
            "explored=EXCLUDED.explored,forced=EXCLUDED.forced,candidates=EXCLUDED.candidates,"
            "greedy=EXCLUDED.greedy,model_step=EXCLUDED.model_step,"
            "model_live=EXCLUDED.model_live",
            {id, d.time, d.model_version, d.chosen, chosen ? chosen->confidence : 0.0, d.propensity,
             d.explored, d.forced, cands, d.greedy, d.model_step, d.model_live}),
        "record decision for " + id);
  }

  void StartAttempts(const std::vector<AttemptStart>& batch, std::vector<Status>* out) override {
    std::vector<std::function<Status()>> writes;
    for (const AttemptStart& a : batch)
      writes.push_back([&] {
        if (node_.empty()) {
          CORTEX_RETURN_IF_ERROR(InsertAttempt(a.id, a.n, a.expert, a.time));
          return UpdateState(a.id, TaskState::kRunning, a.time);
        }
        // In a cluster only the task's node starts it: one that another node took over
        // (this one was declared lost meanwhile) is not run twice. Ownership first: the
        // other node may have recorded an attempt of that number already.
        pg::Result r = write_.Query(
            "UPDATE tasks SET state='running',updated_at=$1,routing=false WHERE id=$2 AND node=$3",
            {a.time, a.id, node_});
        CORTEX_RETURN_IF_ERROR(Done(r, "start attempt"));
        if (!r.Affected()) return NotOurs(a.id);
        return InsertAttempt(a.id, a.n, a.expert, a.time);
      });
    *out = CommitEach(writes);
  }

  Status InsertAttempt(const std::string& id, int n, const std::string& expert, double time) {
    return Done(
        write_.Query("INSERT INTO attempts(task_id,n,expert,started_at) VALUES($1,$2,$3,$4)",
                     {id, n, expert, time}),
        "start attempt");
  }

  void FinishAttempts(const std::vector<AttemptEnd>& batch, std::vector<Status>* out) override {
    std::vector<std::function<Status()>> writes;
    for (const AttemptEnd& a : batch) writes.push_back([&] { return WriteFinish(a); });
    *out = CommitEach(writes);
  }

  Status WriteFinish(const AttemptEnd& a) {
    const Outcome& o = *a.outcome;
    pg::Result r = write_.Query(
        "UPDATE attempts SET finished_at=$1,outcome=$2,quality=$3,duration_s=$4,output=$5,"
        "error=$6 WHERE task_id=$7 AND n=$8 AND ($9='' OR outcome IS NULL)",
        {a.time, ToString(o.kind), o.quality, o.duration_s, o.output, o.error, a.id, a.n, node_});
    // (In a cluster an attempt ends once: a node that declared this one lost ended it.)
    if (r.ok() && !r.Affected() && !node_.empty()) return NotOurs(a.id);
    CORTEX_RETURN_IF_ERROR(
        Changed(r, "finish attempt", "attempt " + std::to_string(a.n) + " of task " + a.id));
    // Only once the attempt really ended here (above): a learning event, numbered at COMMIT.
    if (store::IsTrainingOutcome(o.kind))
      CORTEX_RETURN_IF_ERROR(
          InsertLearn(a.id, a.n, /*feedback=*/false, store::OutcomeReward(o), a.time, nullptr));
    if (!a.ends)  // it waits for its next attempt: routed, so a restart resumes it
      return Done(write_.Query("UPDATE tasks SET state='routed',updated_at=$1 "
                               "WHERE id=$2 AND state='running'",
                               {a.time, a.id}),
                  "finish attempt");
    // The attempt's expert is the one that ended the task.
    return Changed(write_.Query("UPDATE tasks SET state=$1,updated_at=$2,expert=(SELECT expert "
                                "FROM attempts WHERE task_id=$3 AND n=$4) WHERE id=$3",
                                {ToString(*a.ends), a.time, a.id, a.n}),
                   "finish task", "task " + a.id);
  }

  Status UndoStart(const std::string& id, int n) override {
    return Commit([&] {
      CORTEX_RETURN_IF_ERROR(
          Changed(write_.Query("DELETE FROM attempts WHERE task_id=$1 AND n=$2 AND outcome IS NULL",
                               {id, n}),
                  "undo attempt", "open attempt " + std::to_string(n) + " of task " + id));
      return Changed(
          write_.Query("UPDATE tasks SET state='routed' WHERE id=$1 AND state='running'", {id}),
          "undo attempt", "running task " + id);
    });
  }

  Status FinishTask(const std::string& id, TaskState state, const std::string& expert,
                    double time) override {
    return Commit([&] {
      return Changed(write_.Query("UPDATE tasks SET state=$1,expert=$2,updated_at=$3 WHERE id=$4",
                                  {ToString(state), expert, time, id}),
                     "finish task", "task " + id);
    });
  }

  Status SetState(const std::string& id, TaskState state, double time) override {
    return Commit([&] { return UpdateState(id, state, time); });
  }

  Status AddFeedback(const std::string& id, const Feedback& f, int per_hour,
                     FeedbackResult* out) override {
    return Commit([&] {
      *out = FeedbackResult{};
      // Two nodes may take verdicts at once. The person's advisory lock (first, so that
      // every verdict takes its locks in one order) makes the hourly count and the insert
      // one step; the task's row lock makes verdicts on one task one at a time, so each
      // statement after it (READ COMMITTED: a new snapshot each) sees every verdict
      // committed before, and the mean below counts them all.
      if (per_hour > 0)
        CORTEX_RETURN_IF_ERROR(
            Done(write_.Query("SELECT pg_advisory_xact_lock($1::int,hashtext($2))",
                              {kVerdictLock, f.by}),
                 "feedback"));
      pg::Result t = write_.Query("SELECT 1 FROM tasks WHERE id=$1 FOR UPDATE", {id});
      CORTEX_RETURN_IF_ERROR(Done(t, "feedback"));
      if (!t.rows()) return Status::NotFound("no task with id '" + id + "'");
      // The attempt judged: the task's last finished one that is training data (an
      // interrupted or crashed attempt says nothing about the expert's answer).
      pg::Result a = write_.Query(
          "SELECT n,expert,outcome FROM attempts WHERE task_id=$1 AND outcome IS NOT NULL "
          "AND outcome NOT IN ('interrupted','crash') ORDER BY n DESC LIMIT 1",
          {id});
      CORTEX_RETURN_IF_ERROR(Done(a, "feedback"));
      if (!a.rows())
        return Status::FailedPrecondition(
            "task " + id +
            " never finished an attempt (interrupted or crashed ones do not count): "
            "there is nothing to judge");
      out->attempt = static_cast<int>(a.Long(0, 0));
      out->expert = a.Text(0, 1);
      const bool training = store::IsTrainingOutcome(a.Text(0, 2));
      if (per_hour > 0) {
        pg::Result c = write_.Query("SELECT count(*) FROM feedback WHERE \"by\"=$1 AND time>$2",
                                    {f.by, f.time - 3600});
        CORTEX_RETURN_IF_ERROR(Done(c, "feedback"));
        if (c.Long(0, 0) >= per_hour)
          return Status::ResourceExhausted(store::FeedbackBoundMessage(f.by, per_hour));
      }
      // The reward before and after: the mean of every person's latest verdict.
      auto reward = [&](double* r) {
        pg::Result m = write_.Query(
            "SELECT avg(quality) FROM feedback WHERE id IN (SELECT max(id) FROM feedback "
            "WHERE task_id=$1 AND n=$2 GROUP BY \"by\")",
            {id, out->attempt});
        CORTEX_RETURN_IF_ERROR(Done(m, "feedback"));
        if (m.rows() && !m.Null(0, 0)) *r = m.Double(0, 0);
        return Status::OK();
      };
      double before = -1;
      CORTEX_RETURN_IF_ERROR(reward(&before));
      CORTEX_RETURN_IF_ERROR(
          Done(write_.Query("INSERT INTO feedback(task_id,time,quality,note,\"by\",n) "
                            "VALUES($1,$2,$3,$4,$5,$6)",
                            {id, f.time, f.quality, f.note, f.by, out->attempt}),
               "feedback"));
      out->reward = f.quality;
      CORTEX_RETURN_IF_ERROR(reward(&out->reward));
      CORTEX_RETURN_IF_ERROR(
          Done(write_.Query("UPDATE tasks SET feedback_quality=$1 WHERE id=$2", {out->reward, id}),
               "feedback"));
      if (!training || out->reward == before) return Status::OK();
      return InsertLearn(id, out->attempt, /*feedback=*/true, out->reward, f.time, &out->learn_seq);
    });
  }

  Status GetTask(const std::string& id, Task* t) override {
    Reading r(*this);
    CORTEX_RETURN_IF_ERROR(r.status());
    // One snapshot: the task's row, decision and attempts as of one commit.
    CORTEX_RETURN_IF_ERROR(r.c.Exec("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").status());
    Status st = LoadTask(r.c, id, t);
    (void)r.c.Exec("COMMIT");
    return st;
  }

  Status ResolveTaskId(const std::string& prefix, std::string* id) override {
    Reading r(*this);
    CORTEX_RETURN_IF_ERROR(r.status());
    // Ids are ASCII and compared bytewise (COLLATE "C"): every id starting with the prefix
    // sorts in [prefix, prefix + U+10FFFF).
    pg::Result s = r.c.Query("SELECT id FROM tasks WHERE id>=$1 AND id<$2 ORDER BY id LIMIT 3",
                             {prefix, prefix + "\xf4\x8f\xbf\xbf"});
    CORTEX_RETURN_IF_ERROR(s.status().WithContext("resolving a task id"));
    std::vector<std::string> found;
    for (int i = 0; i < s.rows(); ++i) found.push_back(s.Text(i, 0));
    if (std::find(found.begin(), found.end(), prefix) != found.end()) found = {prefix};
    if (found.empty()) return Status::NotFound("no task with id '" + prefix + "'");
    if (found.size() > 1)
      return Status::InvalidArgument(
          "task id '" + prefix + "' is ambiguous: it starts " + found[0] + ", " + found[1] +
          (found.size() > 2 ? " and more" : "") + "; give more characters");
    *id = found[0];
    return Status::OK();
  }

  Status History(const HistoryQuery& q, std::vector<HistoryRow>* rows) override {
    Reading r(*this);
    CORTEX_RETURN_IF_ERROR(r.status());
    rows->clear();
    pg::Result s = r.c.Query(
        "SELECT t.id,t.created_at,t.text,t.state,COALESCE(d.chosen,''),"
        "COALESCE(d.chosen_confidence,0),COALESCE(d.explored,false),la.outcome,"
        "COALESCE(t.feedback_quality,la.quality),COALESCE(NULLIF(t.expert,''),d.chosen,''),"
        // The confidence the decision gave the expert that ended the task.
        "(SELECT (c->>'confidence')::float8 FROM jsonb_array_elements(d.candidates) c "
        "WHERE c->>'expert'=COALESCE(NULLIF(t.expert,''),d.chosen) LIMIT 1),t.seq "
        "FROM tasks t LEFT JOIN decisions d ON d.task_id=t.id "
        "LEFT JOIN LATERAL (SELECT outcome,quality FROM attempts a WHERE a.task_id=t.id "
        "ORDER BY n DESC LIMIT 1) la ON true "
        "WHERE ($1='' OR d.chosen=$1 OR t.expert=$1) AND t.created_at>=$2 AND t.seq>$5 "
        // An outcome kind matches the outcome of the task's last attempt; cancelled and
        // interrupted match the task's state (a task can end so without an attempt).
        "AND ($3='' OR t.state=$3 OR (t.state IN ('succeeded','failed') AND la.outcome=$3)) "
        // The store's order, not the nodes' clocks: a node stamping the future does not
        // keep its tasks on top, nor one stamping the past hide them.
        "ORDER BY t.seq DESC LIMIT $4",
        {q.expert, q.since, q.outcome, q.limit, q.after_seq});
    CORTEX_RETURN_IF_ERROR(s.status().WithContext("history"));
    for (int i = 0; i < s.rows(); ++i) {
      HistoryRow h;
      h.id = s.Text(i, 0);
      h.time = s.Double(i, 1);
      h.text = s.Text(i, 2);
      h.state = s.Text(i, 3);
      h.chosen = s.Text(i, 4);
      h.chosen_confidence = s.Double(i, 5);
      h.explored = s.Bool(i, 6);
      h.expert = s.Text(i, 9);
      h.confidence = s.Double(i, 10);
      h.seq = s.Long(i, 11);
      TaskState st = ParseTaskState(h.state).value_or(TaskState::kQueued);
      // A cancelled task ended so whatever its last attempt said.
      h.outcome = st == TaskState::kCancelled ? "cancelled" : IsFinal(st) ? s.Text(i, 7) : "";
      h.quality = s.Null(i, 8) || !IsFinal(st) ? -1 : s.Double(i, 8);
      rows->push_back(std::move(h));
    }
    return Status::OK();
  }

  Status Stats(std::vector<ExpertStats>* out) override {
    Reading r(*this);
    CORTEX_RETURN_IF_ERROR(r.status());
    CORTEX_RETURN_IF_ERROR(r.c.Exec("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").status());
    std::map<std::string, ExpertStats> m;
    pg::Result a = r.c.Query("SELECT chosen,count(*) FROM decisions GROUP BY chosen");
    // Feedback overrides the quality of the attempt that ended the task.
    pg::Result b = r.c.Query(
        "SELECT a.expert,count(*),sum((a.outcome='success')::int),avg(CASE WHEN "
        "t.feedback_quality IS NOT NULL AND a.n=(SELECT max(n) FROM attempts b WHERE "
        "b.task_id=a.task_id) THEN t.feedback_quality ELSE a.quality END) "
        "FROM attempts a JOIN tasks t ON t.id=a.task_id "
        "WHERE a.outcome IS NOT NULL AND a.outcome<>'interrupted' GROUP BY a.expert");
    pg::Result c = r.c.Query(
        "SELECT d.chosen,count(*),avg(d.chosen_confidence),avg((a.outcome='success')::int),"
        "avg((d.chosen_confidence-(a.outcome='success')::int)*(d.chosen_confidence-"
        "(a.outcome='success')::int)) FROM decisions d JOIN attempts a ON a.task_id=d.task_id "
        "AND a.n=1 WHERE a.outcome IS NOT NULL AND a.outcome<>'interrupted' GROUP BY d.chosen");
    (void)r.c.Exec("COMMIT");
    for (const pg::Result* x : {&a, &b, &c})
      CORTEX_RETURN_IF_ERROR(x->status().WithContext("stats"));
    for (int i = 0; i < a.rows(); ++i) m[a.Text(i, 0)].routed = a.Long(i, 1);
    for (int i = 0; i < b.rows(); ++i) {
      ExpertStats& e = m[b.Text(i, 0)];
      e.attempts = b.Long(i, 1);
      e.successes = b.Long(i, 2);
      e.mean_quality = b.Double(i, 3);
    }
    for (int i = 0; i < c.rows(); ++i) {
      ExpertStats& e = m[c.Text(i, 0)];
      e.calibrated = c.Long(i, 1);
      e.mean_confidence = c.Double(i, 2);
      e.first_success_rate = c.Double(i, 3);
      e.brier = c.Double(i, 4);
    }
    out->clear();
    for (auto& [name, e] : m) {
      e.expert = name;
      out->push_back(e);
    }
    return Status::OK();
  }

  Status RecordExpertEvent(const ExpertEvent& e) override {
    return Commit([&] {
      return Done(write_.Query("INSERT INTO expert_events(time,expert,file,event,detail) "
                               "VALUES($1,$2,$3,$4,$5)",
                               {e.time, e.expert, e.file, e.event, e.detail}),
                  "expert event");
    });
  }

  Status ExpertEvents(int limit, std::vector<ExpertEvent>* out) override {
    Reading r(*this);
    CORTEX_RETURN_IF_ERROR(r.status());
    out->clear();
    pg::Result s = r.c.Query(
        "SELECT time,expert,file,event,detail FROM expert_events ORDER BY id DESC LIMIT $1",
        {limit});
    CORTEX_RETURN_IF_ERROR(s.status().WithContext("expert events"));
    for (int i = 0; i < s.rows(); ++i)
      out->push_back({s.Double(i, 0), s.Text(i, 1), s.Text(i, 2), s.Text(i, 3), s.Text(i, 4)});
    return Status::OK();
  }

  Status ForEachTask(double since, const std::function<bool(const Task&)>& fn) override {
    long after = 0;
    for (;;) {
      std::vector<std::pair<long, std::string>> page;
      {
        Reading r(*this);
        CORTEX_RETURN_IF_ERROR(r.status());
        pg::Result s = r.c.Query(
            "SELECT seq,id FROM tasks WHERE seq>$1 AND created_at>=$2 ORDER BY seq LIMIT 256",
            {after, since});
        CORTEX_RETURN_IF_ERROR(s.status().WithContext("export"));
        for (int i = 0; i < s.rows(); ++i) page.emplace_back(s.Long(i, 0), s.Text(i, 1));
      }
      if (page.empty()) return Status::OK();
      for (const auto& [seq, id] : page) {
        Task t;
        CORTEX_RETURN_IF_ERROR(GetTask(id, &t));
        if (!fn(t)) return Status::OK();
        after = seq;
      }
    }
  }

  Status ForEachLearnEvent(long after_seq,
                           const std::function<bool(const LoggedOutcome&)>& fn) override {
    return ReadLearn(kLearnEventsSql, after_seq, std::numeric_limits<long>::max(), fn);
  }

  Status LearnEvents(long after_seq, long last_seq, long newest,
                     std::vector<LoggedOutcome>* out) override {
    out->clear();
    if (newest > 0) {  // where the newest `newest` begin: one index walk back from last_seq
      Reading r(*this);
      CORTEX_RETURN_IF_ERROR(r.status());
      pg::Result s = r.c.Query(
          "SELECT seq FROM learn WHERE seq>$1 AND seq<=$2 ORDER BY seq DESC LIMIT 1 OFFSET $3",
          {after_seq, last_seq, newest});
      CORTEX_RETURN_IF_ERROR(s.status().WithContext("read learning events"));
      if (s.rows() > 0) after_seq = s.Long(0, 0);
    }
    return ReadLearn(kLearnEventsSql, after_seq, last_seq, [&](const LoggedOutcome& o) {
      out->push_back(o);
      return true;
    });
  }

  Status ForEachOutcome(long after_seq,
                        const std::function<bool(const LoggedOutcome&)>& fn) override {
    return ReadLearn(kOutcomesSql, after_seq, std::numeric_limits<long>::max(), fn);
  }

  Status OutcomeWindowStart(long n, long* after_seq) override {
    Reading r(*this);
    CORTEX_RETURN_IF_ERROR(r.status());
    *after_seq = 0;
    pg::Result s = r.c.Query(
        "SELECT seq FROM learn WHERE NOT feedback ORDER BY seq DESC LIMIT 1 OFFSET $1", {n});
    CORTEX_RETURN_IF_ERROR(s.status().WithContext("outcome window"));
    if (s.rows() > 0) *after_seq = s.Long(0, 0);
    return Status::OK();
  }

  Status NewestLearnSeq(long* any, long* outcome) override {
    Reading r(*this);
    CORTEX_RETURN_IF_ERROR(r.status());
    pg::Result s = r.c.Query(
        "SELECT COALESCE(max(seq),0),COALESCE((SELECT max(seq) FROM learn WHERE NOT feedback),0) "
        "FROM learn");
    CORTEX_RETURN_IF_ERROR(s.status().WithContext("newest learning event"));
    *any = s.Long(0, 0);
    *outcome = s.Long(0, 1);
    return Status::OK();
  }

  Status SaveModel(const ModelRecord& m, long* activation) override {
    // Saved and made live in one transaction: a stop in between cannot leave a version
    // listed as promoted that never was live.
    return Commit([&] {
      if (m.live) {
        CORTEX_RETURN_IF_ERROR(LockLive());
        CORTEX_RETURN_IF_ERROR(
            Done(write_.Query("UPDATE models SET live=false WHERE live"), "set live model"));
      }
      CORTEX_RETURN_IF_ERROR(
          Done(write_.Query("INSERT INTO models(version,created,status,live,trained_through,"
                            "metrics,weights) VALUES($1,$2,$3,$4,$5,$6,$7)",
                            {m.version, m.created, m.status, m.live, m.trained_through, m.metrics,
                             Param::Bytes(m.weights)}),
               "save model v" + std::to_string(m.version)));
      if (!m.live) return Status::OK();
      return InsertActivation(m.version, m.trained_through, "promoted", m.created, activation);
    });
  }

  Status SetLiveModel(int version, long after_seq, const std::string& reason, double time,
                      long* activation) override {
    return Commit([&] {
      CORTEX_RETURN_IF_ERROR(LockLive());
      CORTEX_RETURN_IF_ERROR(
          Done(write_.Query("UPDATE models SET live=false WHERE live"), "set live model"));
      if (version != 0) {  // 0: the untrained model, which has no row
        pg::Result b = write_.Query("UPDATE models SET live=true WHERE version=$1", {version});
        CORTEX_RETURN_IF_ERROR(Done(b, "set live model"));
        if (!b.Affected()) return Status::NotFound("no model version " + std::to_string(version));
      }
      return InsertActivation(version, after_seq, reason, time, activation);
    });
  }

  Status LiveActivation(Activation* out) override {
    Reading r(*this);
    CORTEX_RETURN_IF_ERROR(r.status());
    pg::Result s = r.c.Query(
        "SELECT id,version,after_seq,time,reason FROM activations ORDER BY id DESC LIMIT 1");
    CORTEX_RETURN_IF_ERROR(s.status().WithContext("live model"));
    if (!s.rows()) return Status::NotFound("no model was ever made live");
    *out = ActivationRow(s);
    return Status::OK();
  }

  Status GetActivation(long id, Activation* out) override {
    Reading r(*this);
    CORTEX_RETURN_IF_ERROR(r.status());
    pg::Result s =
        r.c.Query("SELECT id,version,after_seq,time,reason FROM activations WHERE id=$1", {id});
    CORTEX_RETURN_IF_ERROR(s.status().WithContext("activation"));
    if (!s.rows()) return Status::NotFound("no activation " + std::to_string(id));
    *out = ActivationRow(s);
    return Status::OK();
  }

  Status SaveCheckpoint(const Checkpoint& c) override {
    // Any node may save the same checkpoint, bit for bit: the first one stays.
    return Commit([&] {
      return Done(write_.Query("INSERT INTO checkpoints(activation,step,seq,rng,weights) "
                               "VALUES($1,$2,$3,$4,$5) ON CONFLICT DO NOTHING",
                               {c.activation, c.step, c.seq, static_cast<long>(c.rng),
                                Param::Bytes(c.weights)}),
                  "save checkpoint");
    });
  }

  Status LoadCheckpoint(long activation, long max_step, Checkpoint* out) override {
    Reading r(*this);
    CORTEX_RETURN_IF_ERROR(r.status());
    pg::Result s = r.c.Query(
        "SELECT activation,step,seq,rng,weights FROM checkpoints WHERE activation=$1 AND "
        "step<=$2 ORDER BY step DESC LIMIT 1",
        {activation, max_step});
    CORTEX_RETURN_IF_ERROR(s.status().WithContext("load checkpoint"));
    if (!s.rows()) return Status::NotFound("no checkpoint");
    out->activation = s.Long(0, 0);
    out->step = s.Long(0, 1);
    out->seq = s.Long(0, 2);
    // All 64 bits (Result::Long goes through a double).
    out->rng = static_cast<uint64_t>(std::strtoll(s.Text(0, 3).c_str(), nullptr, 10));
    out->weights = s.Bytes(0, 4);
    return Status::OK();
  }

  Status PruneModels(int keep, std::vector<int>* deleted) override {
    deleted->clear();
    return Commit([&] {
      deleted->clear();
      CORTEX_RETURN_IF_ERROR(LockLive());  // no version goes live while it is judged unused
      pg::Result d = write_.Query(
          "DELETE FROM models WHERE version IN (SELECT version FROM models WHERE "
          "status='refused' AND NOT live AND version NOT IN (SELECT version FROM activations) "
          "ORDER BY version DESC OFFSET $1) RETURNING version",
          {keep});
      CORTEX_RETURN_IF_ERROR(Done(d, "prune model versions"));
      for (int i = 0; i < d.rows(); ++i) deleted->push_back(static_cast<int>(d.Long(i, 0)));
      std::sort(deleted->rbegin(), deleted->rend());
      return Status::OK();
    });
  }

  Status ListModels(std::vector<ModelRecord>* out) override {
    Reading r(*this);
    CORTEX_RETURN_IF_ERROR(r.status());
    out->clear();
    pg::Result s = r.c.Query(
        "SELECT version,created,status,live,trained_through,metrics,octet_length(weights) "
        "FROM models ORDER BY version");
    CORTEX_RETURN_IF_ERROR(s.status().WithContext("list models"));
    for (int i = 0; i < s.rows(); ++i) out->push_back(ListedModel(s, i));
    return Status::OK();
  }

  Status LoadModel(int version, ModelRecord* m) override {
    Reading r(*this);
    CORTEX_RETURN_IF_ERROR(r.status());
    pg::Result s = r.c.Query(
        "SELECT version,created,status,live,trained_through,metrics,octet_length(weights),"
        "weights FROM models WHERE version=$1",
        {version});
    CORTEX_RETURN_IF_ERROR(s.status().WithContext("load model"));
    if (s.rows() == 0) return Status::NotFound("no model version " + std::to_string(version));
    *m = ListedModel(s, 0);
    m->weights = s.Bytes(0, 7);
    m->weights_bytes = static_cast<long>(m->weights.size());
    return Status::OK();
  }

  Status MarkRouting(const std::vector<std::string>& ids) override {
    return Commit([&] {
      for (const auto& id : ids)
        CORTEX_RETURN_IF_ERROR(Done(write_.Query("UPDATE tasks SET routing=true WHERE id=$1", {id}),
                                    "mark task " + id + " as routing"));
      return Status::OK();
    });
  }

  Status Recover(double time, bool crashed, Recovery* out) override {
    *out = Recovery{};
    int interrupted = 0;
    std::vector<std::string> poisoned, ids;
    CORTEX_RETURN_IF_ERROR(Commit([&] {
      poisoned.clear();
      CORTEX_RETURN_IF_ERROR(
          Done(write_.Query("UPDATE tasks SET deaths=deaths+$1,routing=false "
                            "WHERE (routing OR state='running') AND ($2='' OR node=$2)",
                            {crashed ? 1 : 0, node_}),
               "count deaths"));
      pg::Result p = write_.Query(
          "UPDATE tasks SET state='failed',updated_at=greatest($1,created_at),error=$2 WHERE "
          "state IN ('queued','routed') AND deaths>=$3 AND ($4='' OR node=$4) RETURNING id",
          {time, store::PoisonError(), kPoisonDeaths, node_});
      CORTEX_RETURN_IF_ERROR(Done(p, "fail poison tasks"));
      for (int i = 0; i < p.rows(); ++i) poisoned.push_back(p.Text(i, 0));
      CORTEX_RETURN_IF_ERROR(
          Done(write_.Query(
                   "UPDATE attempts SET outcome='interrupted',finished_at=greatest($1,started_at),"
                   "quality=0,"
                   "error='cortexd stopped while this attempt ran' WHERE outcome IS NULL "
                   "AND ($2='' OR task_id IN (SELECT id FROM tasks WHERE node=$2))",
                   {time, node_}),
               "recover attempts"));
      pg::Result t = write_.Query(
          "UPDATE tasks SET state='interrupted',updated_at=greatest($1,created_at) "
          "WHERE state='running' "
          "AND ($2='' OR node=$2)",
          {time, node_});
      CORTEX_RETURN_IF_ERROR(Done(t, "recover tasks"));
      interrupted = static_cast<int>(t.Affected());
      return Status::OK();
    }));
    {
      Reading r(*this);
      CORTEX_RETURN_IF_ERROR(r.status());
      pg::Result s = r.c.Query(
          "SELECT id FROM tasks WHERE state IN ('queued','routed') AND ($1='' OR node=$1) "
          "ORDER BY created_at, seq",
          {node_});
      CORTEX_RETURN_IF_ERROR(s.status().WithContext("recover"));
      for (int i = 0; i < s.rows(); ++i) ids.push_back(s.Text(i, 0));
    }
    std::sort(poisoned.begin(), poisoned.end());
    out->poisoned = std::move(poisoned);
    out->interrupted = interrupted;
    for (const auto& id : ids) {
      Task t;
      CORTEX_RETURN_IF_ERROR(GetTask(id, &t));
      out->requeue.push_back(std::move(t));
    }
    return Status::OK();
  }

  Status Report(const ReportQuery& q, ReportData* out) override {
    *out = ReportData{};
    // A report scans whole tables: on a connection of its own, so no other read waits
    // behind it; one at a time; cancelled on the server when the store closes.
    std::lock_guard<std::mutex> one(report_mu_);
    if (closing_reports_) return Status::Unavailable("cortexd is stopping");
    pg::Conn c;
    CORTEX_RETURN_IF_ERROR(c.Connect(url_, "report"));
    {
      std::lock_guard<std::mutex> l(cancel_mu_);
      if (closing_reports_) return Status::Unavailable("cortexd is stopping");
      cancel_ = PQgetCancel(c.raw());
    }
    Status st = c.Exec("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").status();  // one snapshot
    if (st.ok()) st = ReportIn(c, q, out);
    {
      std::lock_guard<std::mutex> l(cancel_mu_);
      PQfreeCancel(cancel_);
      cancel_ = nullptr;
    }
    if (closing_reports_) return Status::Unavailable("cortexd is stopping: the report was ended");
    return st;
  }

  void StopReports() override {
    closing_reports_ = true;
    std::lock_guard<std::mutex> l(cancel_mu_);
    if (cancel_) {
      char err[256];
      (void)PQcancel(cancel_, err, sizeof err);
    }
  }

  Status ReportIn(pg::Conn& c, const ReportQuery& q, ReportData* out) {
    // The window: as asked, else from the first task (or, with none, the first event or
    // model) to the last thing that happened in it, so that the plots span the activity.
    const double now = Env::Default()->NowUnix();
    double since = q.since, until = q.until;
    if (since <= 0) {
      pg::Result s = c.Query(
          "SELECT coalesce((SELECT min(created_at) FROM tasks),(SELECT min(t) FROM "
          "(SELECT min(time) t FROM expert_events UNION ALL SELECT min(created) FROM models) x))");
      CORTEX_RETURN_IF_ERROR(s.status().WithContext("report"));
      since = s.rows() && !s.Null(0, 0) ? s.Double(0, 0) : now;
      if (until > 0) since = std::min(since, until);  // a window that ends before it all
    }
    if (until <= 0) {
      pg::Result s = c.Query(
          "SELECT max(t) FROM (SELECT max(updated_at) t FROM tasks WHERE created_at>=$1 "
          "UNION ALL SELECT max(time) FROM expert_events WHERE time>=$1 "
          "UNION ALL SELECT max(created) FROM models WHERE created>=$1) x",
          {since});
      CORTEX_RETURN_IF_ERROR(s.status().WithContext("report"));
      until = s.rows() && !s.Null(0, 0) ? s.Double(0, 0) : since;
    }
    until = std::max(until, since);
    {
      pg::Result s = c.Query("SELECT count(*) FROM tasks WHERE created_at>=$1 AND created_at<=$2",
                             {since, until});
      CORTEX_RETURN_IF_ERROR(s.status().WithContext("report"));
      out->tasks = s.Long(0, 0);
    }
    const size_t n = store::SizeReport(q, since, until, out);
    auto bucket = [&](long b) { return store::Bucket(*out, b); };
    const double w = out->bucket_s;
    {
      pg::Result s = c.Query(
          "SELECT floor((d.time-$1)/$3)::bigint,count(*),"
          "sum((a.outcome IS NOT NULL AND a.outcome<>'interrupted')::int),"
          "sum((a.outcome='success')::int),"
          // The model's number, as SQLite's CAST(substr(v,2) AS INTEGER) reads it.
          "max(coalesce(substring(d.model_version from '^.([0-9]{1,9})')::int,0)) "
          "FROM decisions d LEFT JOIN attempts a ON a.task_id=d.task_id AND a.n=1 "
          "WHERE d.time>=$1 AND d.time<=$2 GROUP BY 1",
          {since, until, w});
      CORTEX_RETURN_IF_ERROR(s.status().WithContext("report"));
      for (int i = 0; i < s.rows(); ++i) {
        const size_t b = bucket(s.Long(i, 0));
        out->decided[b] += s.Long(i, 1);
        out->first_done[b] += s.Long(i, 2);
        out->first_ok[b] += s.Long(i, 3);
        out->model_version[b] = std::max(out->model_version[b], static_cast<int>(s.Long(i, 4)));
      }
    }
    {
      // Clamped: an older version stamped a task's end by a wall clock stepped back.
      pg::Result s = c.Query(
          "SELECT floor((updated_at-$1)/$3)::bigint,count(*),sum((state='succeeded')::int),"
          "sum(greatest(updated_at-created_at,0)),max(greatest(updated_at-created_at,0)) FROM "
          "tasks "
          "WHERE created_at>=$1 AND updated_at<=$2 "
          "AND state IN ('succeeded','failed','cancelled','interrupted') GROUP BY 1",
          {since, until, w});
      CORTEX_RETURN_IF_ERROR(s.status().WithContext("report"));
      std::vector<double> sum(n, 0);
      for (int i = 0; i < s.rows(); ++i) {
        const size_t b = bucket(s.Long(i, 0));
        out->finished[b] += s.Long(i, 1);
        out->succeeded[b] += s.Long(i, 2);
        sum[b] += s.Double(i, 3);
        out->latency_max[b] = std::max(out->latency_max[b], s.Double(i, 4));
      }
      for (size_t b = 0; b < n; ++b)
        if (out->finished[b]) out->latency_mean[b] = sum[b] / out->finished[b];
    }
    // Counts per bucket by name, from rows of (bucket, name, count).
    using Series = std::vector<std::pair<std::string, std::vector<long>>>;
    auto named_series = [&](const char* sql, Series* series) {
      std::map<std::string, std::vector<long>> by;
      pg::Result s = c.Query(sql, {since, until, w});
      CORTEX_RETURN_IF_ERROR(s.status().WithContext("report"));
      for (int i = 0; i < s.rows(); ++i) {
        auto& v = by[s.Text(i, 1)];
        v.resize(n, 0);
        v[bucket(s.Long(i, 0))] += s.Long(i, 2);
      }
      *series = Series(by.begin(), by.end());
      return Status::OK();
    };
    CORTEX_RETURN_IF_ERROR(
        named_series("SELECT floor((time-$1)/$3)::bigint,chosen,count(*) FROM decisions "
                     "WHERE time>=$1 AND time<=$2 GROUP BY 1,2",
                     &out->share));
    {
      store::CalibrationRows cal;
      pg::Result s = c.Query(
          "SELECT d.chosen,least(floor(d.chosen_confidence*10)::int,9),count(*),"
          "avg(d.chosen_confidence),avg((a.outcome='success')::int),"
          "sum((d.chosen_confidence-(a.outcome='success')::int)*(d.chosen_confidence-"
          "(a.outcome='success')::int)) FROM decisions d JOIN attempts a ON a.task_id=d.task_id "
          "AND a.n=1 WHERE a.outcome IS NOT NULL AND a.outcome<>'interrupted' "
          "AND d.time>=$1 AND d.time<=$2 GROUP BY 1,2",
          {since, until});
      CORTEX_RETURN_IF_ERROR(s.status().WithContext("report"));
      for (int i = 0; i < s.rows(); ++i)
        cal.Add(s.Text(i, 0), s.Long(i, 1), s.Long(i, 2), s.Double(i, 3), s.Double(i, 4),
                s.Double(i, 5));
      cal.Finish(out);
    }
    {
      // The statement is built once (prepared statements are keyed by the text's address).
      static const std::string sql = store::LatencySql("$1", "$2");
      pg::Result s = c.Query(sql.c_str(), {since, until});
      CORTEX_RETURN_IF_ERROR(s.status().WithContext("report"));
      for (int i = 0; i < s.rows(); ++i)
        out->latency_counts[std::min<size_t>(s.Long(i, 0), out->latency_edges.size())] +=
            s.Long(i, 1);
    }
    CORTEX_RETURN_IF_ERROR(
        named_series("SELECT floor((time-$1)/$3)::bigint,event,count(*) FROM expert_events "
                     "WHERE time>=$1 AND time<=$2 GROUP BY 1,2",
                     &out->events));
    {
      pg::Result e = c.Query(
          "SELECT time,expert,file,event,detail FROM expert_events WHERE time>=$1 AND "
          "time<=$2 ORDER BY id DESC LIMIT 30",
          {since, until});
      CORTEX_RETURN_IF_ERROR(e.status().WithContext("report"));
      for (int i = 0; i < e.rows(); ++i)
        out->recent_events.push_back(
            {e.Double(i, 0), e.Text(i, 1), e.Text(i, 2), e.Text(i, 3), e.Text(i, 4)});
    }
    {
      pg::Result s = c.Query(
          "SELECT rl,count(DISTINCT d.task_id) FROM decisions d,"
          "jsonb_array_elements(d.candidates) c,jsonb_array_elements_text(c->'rules') rl "
          "WHERE d.time>=$1 AND d.time<=$2 AND jsonb_typeof(c->'rules')='array' "
          "GROUP BY 1 ORDER BY 2 DESC,rl COLLATE \"C\" LIMIT 20",
          {since, until});
      CORTEX_RETURN_IF_ERROR(s.status().WithContext("report"));
      for (int i = 0; i < s.rows(); ++i) out->rules.emplace_back(s.Text(i, 0), s.Long(i, 1));
    }
    {
      pg::Result s = c.Query(
          "SELECT version,created,status,live,trained_through,metrics,octet_length(weights) "
          "FROM models WHERE created>=$1 AND created<=$2 ORDER BY version",
          {since, until});
      CORTEX_RETURN_IF_ERROR(s.status().WithContext("report"));
      for (int i = 0; i < s.rows(); ++i) out->models.push_back(ListedModel(s, i));
    }
    return Status::OK();
  }

  Status CountByState(std::vector<std::pair<std::string, long>>* counts) override {
    Reading r(*this);
    CORTEX_RETURN_IF_ERROR(r.status());
    counts->clear();
    pg::Result s =
        r.c.Query("SELECT state,count(*) FROM tasks GROUP BY state ORDER BY state COLLATE \"C\"");
    CORTEX_RETURN_IF_ERROR(s.status().WithContext("count tasks"));
    for (int i = 0; i < s.rows(); ++i) counts->emplace_back(s.Text(i, 0), s.Long(i, 1));
    return Status::OK();
  }

  Status Health() override {
    std::lock_guard<std::mutex> l(mu_);
    return Ready();
  }

  Status Sync() override { return Status::OK(); }  // every commit waited for the server's disk

  Status SetNode(const std::string& node) override {
    if (node.empty()) return Status::InvalidArgument("a node needs a name");
    node_ = node;
    return Status::OK();
  }

  Status CancelShared(const std::string& id, double time, std::string* owner) override {
    owner->clear();
    pg::Result r;
    CORTEX_RETURN_IF_ERROR(Commit([&] {
      r = write_.Query(
          "UPDATE tasks SET state='cancelled',updated_at=$1,routing=false WHERE "
          "id=$2 AND node IS NULL AND state IN ('queued','routed') RETURNING id",
          {time, id});
      return Done(r, "cancel task " + id);
    }));
    if (r.rows()) return Status::OK();
    Reading rd(*this);
    CORTEX_RETURN_IF_ERROR(rd.status());
    pg::Result w = rd.c.Query("SELECT COALESCE(node,''),state FROM tasks WHERE id=$1", {id});
    CORTEX_RETURN_IF_ERROR(w.status().WithContext("cancel task " + id));
    if (!w.rows()) return Status::NotFound("no task with id '" + id + "'");
    *owner = w.Text(0, 0);
    return Status::FailedPrecondition("task " + id + " (" + w.Text(0, 1) + ") is " +
                                      (owner->empty() ? "no node's" : "node " + *owner + "'s"));
  }

  void Release(const std::vector<std::pair<std::string, std::string>>& tasks,
               std::vector<Status>* out) override {
    std::vector<std::function<Status()>> writes;
    for (size_t i = 0; i < tasks.size(); ++i)
      writes.push_back([&, i, this] {
        const std::string &id = tasks[i].first, &want = tasks[i].second;
        pg::Result r = write_.Query(
            "UPDATE tasks SET node=NULL,want=$1 WHERE id=$2 AND node=$3 AND state='routed'",
            {want, id, node_});
        CORTEX_RETURN_IF_ERROR(Done(r, "hand task " + id + " to the shared queue"));
        return r.Affected() ? Status::OK() : NotOurs(id);
      });
    *out = CommitEach(writes);
  }

  int SchemaVersion() override {
    Reading r(*this);
    if (!r.status().ok()) return 0;
    pg::Result s = r.c.Query("SELECT version FROM cortex_schema");
    return s.ok() && s.rows() ? static_cast<int>(s.Long(0, 0)) : 0;
  }
  std::string Path() const override { return shown_; }

  // Only whether the database could be used (cortexd --check-config): it is reachable,
  // and empty or ours and not newer; nothing is written.
  Status Probe() {
    CORTEX_RETURN_IF_ERROR(write_.Connect(url_, "check"));
    return Migrate(/*apply=*/false);
  }

 private:
  // The database must be empty or ours, and not newer than this build; migrations run
  // under an advisory lock, so that nodes starting together migrate once.
  Status Migrate(bool apply = true) {
    auto refuse = [&](const std::string& why) {
      (void)write_.Exec("ROLLBACK");
      return Status::Corruption("refusing to use " + shown_ + ": not a Cortex store (" + why +
                                "); use an empty database or set store.url to another one");
    };
    CORTEX_RETURN_IF_ERROR(write_.Exec("BEGIN").status());
    pg::Result l = write_.Query("SELECT pg_advisory_xact_lock($1)", {kMigrateLock});
    pg::Result s = write_.Query(
        // Any table, view or sequence in the schema we would write to is another's.
        "SELECT to_regclass('cortex_schema') IS NOT NULL,(SELECT count(*) FROM pg_catalog.pg_class "
        "c JOIN pg_catalog.pg_namespace n ON n.oid=c.relnamespace WHERE n.nspname=current_schema() "
        "AND c.relkind IN ('r','p','v','m','f','S'))");
    for (const pg::Result* x : {&l, &s})
      if (!x->ok()) {
        (void)write_.Exec("ROLLBACK");
        return x->status().WithContext("opening store " + shown_);
      }
    long version = 0;
    if (s.Bool(0, 0)) {
      pg::Result v = write_.Query("SELECT application,version FROM cortex_schema");
      if (!v.ok() || v.rows() != 1 || v.Text(0, 0) != "cortex")
        return refuse("its cortex_schema table is not Cortex's");
      version = v.Long(0, 1);
    } else if (s.Long(0, 1) > 0) {
      return refuse("it holds another application's tables or views");
    }
    if (version > kSchemaVersion) {
      (void)write_.Exec("ROLLBACK");
      return Status::FailedPrecondition("store " + shown_ + " has schema version " +
                                        std::to_string(version) +
                                        ", newer than this cortexd understands (" +
                                        std::to_string(kSchemaVersion) + "); upgrade cortexd");
    }
    // DDL is transactional in PostgreSQL: a failed step leaves the database as it was.
    for (long v = version; apply && v < kSchemaVersion; ++v) {
      Status st = write_.Exec(kMigrations[v]).status();
      if (st.ok())
        st =
            write_.Query("UPDATE cortex_schema SET version=$1", {static_cast<int>(v + 1)}).status();
      if (!st.ok()) {
        (void)write_.Exec("ROLLBACK");
        return st.WithContext("migrating store to v" + std::to_string(v + 1));
      }
    }
    return write_.Exec(apply ? "COMMIT" : "ROLLBACK").status();
  }

  // The writer's connection is up (reconnected, and the lock taken again, after it broke).
  Status Ready() {
    if (!write_.Broken()) return Status::OK();
    Status st = write_.Reset();
    if (!st.ok()) {
      write_.Close();  // reconnect on the next write, not half-way through this one's
      return st.WithContext("store " + shown_ + ": the connection to PostgreSQL was lost");
    }
    LogWarn("store {}: reconnected to PostgreSQL", shown_);
    return Status::OK();
  }

  // Group commit: the writes queued together share one transaction and its COMMIT; each
  // returns with its own status (sqlite_store.cc has the same queue and reasoning).
  struct Write {
    const std::function<Status()>* fn = nullptr;
    Status result = Status::Internal("store: the write was not made");
  };
  static constexpr size_t kMaxGroup = 512;

  Status Commit(const std::function<Status()>& write) { return CommitEach({write})[0]; }

  std::vector<Status> CommitEach(const std::vector<std::function<Status()>>& writes) {
    std::vector<Write> mine(writes.size());
    std::vector<Write*> items;
    for (size_t i = 0; i < writes.size(); ++i) {
      mine[i].fn = &writes[i];
      items.push_back(&mine[i]);
    }
    writers_.Run(items, [this](const std::vector<Write*>& group, const std::function<void()>&) {
      CommitGroup(group);
    });
    std::vector<Status> out;
    for (Write& w : mine) out.push_back(std::move(w.result));
    return out;
  }

  void CommitGroup(const std::vector<Write*>& group) {
    std::lock_guard<std::mutex> l(mu_);
    Status st = Ready();
    if (!st.ok()) {
      for (Write* w : group) w->result = st;
      return;
    }
    // Writes almost never fail one by one: the group runs without a savepoint per write
    // first, and again with one each only when a write failed.
    if (group.size() == 1 || !TryGroup(group, /*isolated=*/false)) TryGroup(group, true);
  }

  // One transaction over the group. Not `isolated`: returns false, having rolled back,
  // as soon as a write fails.
  bool TryGroup(const std::vector<Write*>& group, bool isolated) {
    const bool savepoints = isolated && group.size() > 1;
    Status st = write_.Exec("BEGIN").status();
    learn_pending_.clear();
    if (!st.ok()) {
      for (Write* w : group) w->result = st;
      return true;
    }
    bool any = false;
    Status lost;  // set when the transaction is gone (the connection broke)
    for (Write* w : group) {
      if (savepoints) (void)write_.Exec("SAVEPOINT w");
      w->result = (*w->fn)();
      if (write_.Broken() || write_.TxStatus() == PQTRANS_IDLE) {
        lost = w->result.ok() ? Status::IOError("store: the transaction was lost") : w->result;
        break;
      }
      if (!w->result.ok() && !isolated) {
        (void)write_.Exec("ROLLBACK");
        return false;
      }
      if (savepoints) {
        if (!w->result.ok()) (void)write_.Exec("ROLLBACK TO SAVEPOINT w");
        (void)write_.Exec("RELEASE SAVEPOINT w");
      }
      any |= w->result.ok();
    }
    if (!lost.ok()) {
      for (Write* w : group) w->result = lost;
      return true;
    }
    if (!any) {
      (void)write_.Exec("ROLLBACK");
      return true;
    }
    if (!learn_pending_.empty()) {
      Status n = NumberLearnEvents();
      if (!n.ok()) {
        (void)write_.Exec("ROLLBACK");
        for (Write* w : group)
          if (w->result.ok()) w->result = n;
        return true;
      }
    }
    pg::Result c = write_.Exec("COMMIT");
    Status committed = c.status();
    if (committed.ok() && c.CommandTag() != "COMMIT")  // a failed transaction answers ROLLBACK
      committed = Status::IOError("store: the transaction was rolled back, not committed");
    if (!committed.ok()) {
      // A COMMIT without an answer may or may not have been made: say so.
      if (write_.Broken())
        committed = Status::IOError(
            "store: the connection to PostgreSQL broke during COMMIT; the write may or may "
            "not have been committed (" +
            committed.message() + ")");
      for (Write* w : group)
        if (w->result.ok()) w->result = committed;
    }
    return true;
  }

  // A learning event of this transaction, unnumbered until NumberLearnEvents; its seq will
  // be written to *seq (when not null).
  Status InsertLearn(const std::string& id, int n, bool feedback, double reward, double time,
                     long* seq) {
    pg::Result r = write_.Query(
        "INSERT INTO learn(task_id,n,feedback,reward,time) VALUES($1,$2,$3,$4,$5) RETURNING id",
        {id, n, feedback, reward, time});
    CORTEX_RETURN_IF_ERROR(
        Done(r, feedback ? "log feedback for learning" : "log outcome for learning"));
    learn_pending_.emplace_back(r.Long(0, 0), seq);
    return Status::OK();
  }

  // Numbers the transaction's learning events (in the order they were inserted), the last
  // thing before its COMMIT. Why a counter row and not a sequence: nextval hands out
  // numbers in one order and transactions commit in another, so a reader could see N+1
  // committed, resume after it, and never see N, committed later (several nodes write to
  // one database). The counter's row lock is held from this UPDATE to the COMMIT: another
  // writer waits here until this one has committed (and is visible) and then numbers after
  // it, so seq order is commit order. Taken last, after every other row the transaction
  // locks, so a transaction holding it waits for nothing else and no deadlock can go
  // through it; and it is held only for the COMMIT (a node frozen holding it loses its
  // session after a second idle: Conn::Connect). Only this transaction's own rows are
  // unnumbered to it: other transactions' are invisible until they commit, numbered.
  Status NumberLearnEvents() {
    pg::Result r = write_.Query(
        "WITH p AS (SELECT id,row_number() OVER (ORDER BY id) AS k,count(*) OVER () AS c "
        "FROM learn WHERE seq IS NULL),"
        "v AS (UPDATE learn_counter SET v=v+(SELECT count(*) FROM p) RETURNING v) "
        "UPDATE learn l SET seq=v.v-p.c+p.k FROM p,v WHERE l.id=p.id RETURNING l.id,l.seq");
    CORTEX_RETURN_IF_ERROR(Done(r, "number learning events"));
    std::map<long, long> seqs;
    for (int i = 0; i < r.rows(); ++i) seqs[r.Long(i, 0)] = r.Long(i, 1);
    for (const auto& [id, out] : learn_pending_) {
      auto it = seqs.find(id);
      if (out && it != seqs.end()) *out = it->second;  // (not found: its write was undone)
    }
    return Status::OK();
  }

  // Taken first by every write that changes which model is live (see kLiveLock).
  Status LockLive() {
    return Done(write_.Query("SELECT pg_advisory_xact_lock($1)", {kLiveLock}), "set live model");
  }

  Status InsertActivation(int version, long after_seq, const std::string& reason, double time,
                          long* id) {
    pg::Result r = write_.Query(
        "INSERT INTO activations(version,after_seq,time,reason) VALUES($1,$2,$3,$4) RETURNING id",
        {version, after_seq, time, reason});
    CORTEX_RETURN_IF_ERROR(Done(r, "record the live model"));
    if (id) *id = r.Long(0, 0);
    return Status::OK();
  }

  Status ReadLearn(const char* sql, long after, long last,
                   const std::function<bool(const LoggedOutcome&)>& fn) {
    for (;;) {
      std::vector<LoggedOutcome> page;
      {
        Reading r(*this);
        CORTEX_RETURN_IF_ERROR(r.status());
        pg::Result s = r.c.Query(sql, {after, last, kLearnPage});
        CORTEX_RETURN_IF_ERROR(s.status().WithContext("read learning events"));
        for (int i = 0; i < s.rows(); ++i) page.push_back(LearnRow(s, i));
      }
      for (const LoggedOutcome& o : page) {
        if (!fn(o)) return Status::OK();
        after = o.seq;
      }
      if (static_cast<long>(page.size()) < kLearnPage) return Status::OK();
    }
  }

  // A write for a task another node has taken over.
  Status NotOurs(const std::string& id) {
    return Status::FailedPrecondition("task " + id + " is no longer node " + node_ +
                                      "'s: another node took it over after declaring this one "
                                      "lost");
  }

  Status Done(const pg::Result& r, const std::string& what) {
    return r.ok() ? Status::OK() : r.status().WithContext(what);
  }
  // OK when the statement changed a row; NotFound("no " + thing) when it changed none.
  Status Changed(const pg::Result& r, const std::string& what, const std::string& thing) {
    CORTEX_RETURN_IF_ERROR(Done(r, what));
    return r.Affected() > 0 ? Status::OK() : Status::NotFound("no " + thing);
  }
  Status UpdateState(const std::string& id, TaskState state, double time) {
    return Changed(write_.Query("UPDATE tasks SET state=$1,updated_at=$2,routing=false WHERE id=$3",
                                {ToString(state), time, id}),
                   "update task state", "task with id '" + id + "'");
  }

  // A read on the reader's connection, reconnected first if it broke.
  struct Reading {
    explicit Reading(PgStore& s) : c(s.read_), l(s.read_mu_) { st = c.Reset(); }
    const Status& status() const { return st; }
    pg::Conn& c;
    std::lock_guard<std::mutex> l;
    Status st;
  };

  Status LoadTask(pg::Conn& c, const std::string& id, Task* t) {
    *t = Task{};
    pg::Result s = c.Query(
        "SELECT id,text,tags,state,created_at,updated_at,COALESCE(expert,''),deaths,"
        "COALESCE(error,'') FROM tasks WHERE id=$1",
        {id});
    CORTEX_RETURN_IF_ERROR(s.status().WithContext("read task " + id));
    if (s.rows() == 0) return Status::NotFound("no task with id '" + id + "'");
    t->id = s.Text(0, 0);
    t->text = s.Text(0, 1);
    t->tags = ParseTags(s.Text(0, 2));
    t->state = ParseTaskState(s.Text(0, 3)).value_or(TaskState::kQueued);
    t->created_at = s.Double(0, 4);
    t->updated_at = s.Double(0, 5);
    t->expert = s.Text(0, 6);
    t->deaths = static_cast<int>(s.Long(0, 7));
    t->error = s.Text(0, 8);
    pg::Result d = c.Query(
        "SELECT time,model_version,chosen,propensity,explored,forced,candidates,"
        "COALESCE(model_step,-1),COALESCE(model_live,0) FROM decisions WHERE task_id=$1",
        {id});
    CORTEX_RETURN_IF_ERROR(d.status().WithContext("read task " + id));
    if (d.rows() > 0) {
      Decision x;
      x.time = d.Double(0, 0);
      x.model_version = d.Text(0, 1);
      x.chosen = d.Text(0, 2);
      x.propensity = d.Double(0, 3);
      x.explored = d.Bool(0, 4);
      x.forced = d.Bool(0, 5);
      x.candidates = store::ParseCandidates(json::parse(d.Text(0, 6), nullptr, false));
      x.model_step = d.Long(0, 7);
      x.model_live = d.Long(0, 8);
      t->decision = std::move(x);
    }
    pg::Result a = c.Query(
        "SELECT n,expert,started_at,COALESCE(finished_at,0),outcome,COALESCE(quality,0),"
        "COALESCE(duration_s,0),COALESCE(output,''),COALESCE(error,'') FROM attempts "
        "WHERE task_id=$1 ORDER BY n",
        {id});
    CORTEX_RETURN_IF_ERROR(a.status().WithContext("read task " + id));
    for (int i = 0; i < a.rows(); ++i) {
      Attempt x;
      x.n = static_cast<int>(a.Long(i, 0));
      x.expert = a.Text(i, 1);
      x.started_at = a.Double(i, 2);
      x.finished_at = a.Double(i, 3);
      if (!a.Null(i, 4)) {
        Outcome o;
        o.kind = ParseOutcomeKind(a.Text(i, 4)).value_or(OutcomeKind::kFailure);
        o.quality = a.Double(i, 5);
        o.duration_s = a.Double(i, 6);
        o.output = a.Text(i, 7);
        o.error = a.Text(i, 8);
        x.outcome = std::move(o);
      }
      t->attempts.push_back(std::move(x));
    }
    pg::Result f = c.Query(
        "SELECT time,quality,note,\"by\",n FROM feedback WHERE task_id=$1 ORDER BY id", {id});
    CORTEX_RETURN_IF_ERROR(f.status().WithContext("read task " + id));
    for (int i = 0; i < f.rows(); ++i)
      t->feedback.push_back({f.Double(i, 0), f.Double(i, 1), f.Text(i, 2), f.Text(i, 3),
                             static_cast<int>(f.Long(i, 4))});
    return Status::OK();
  }

  const std::string url_;    // as configured (it may hold a password)
  const std::string shown_;  // as shown: the password replaced by ***
  std::string node_;         // in a cluster, this cortexd's node (SetNode, before any write)
  pg::Conn write_;
  std::mutex mu_;  // the writer's connection; a group holds it for its whole transaction
  GroupQueue<Write> writers_{kMaxGroup};
  pg::Conn read_;
  std::mutex read_mu_;
  std::mutex report_mu_;  // one report at a time, each on a connection of its own
  std::mutex cancel_mu_;  // guards cancel_
  PGcancel* cancel_ = nullptr;
  std::atomic<bool> closing_reports_{false};
  // The open transaction's learning events (learn.id) and where each one's seq goes.
  std::vector<std::pair<long, long*>> learn_pending_;
};

}  // namespace

Status ProbePostgresStore(const std::string& url) { return PgStore(url).Probe(); }

Result<std::unique_ptr<Store>> OpenPostgresStore(const std::string& url) {
  auto s = std::make_unique<PgStore>(url);
  Status st = s->Open();
  if (!st.ok()) return st;
  return std::unique_ptr<Store>(std::move(s));
}

}  // namespace cortex
