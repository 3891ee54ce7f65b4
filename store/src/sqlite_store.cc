// SQLite backend of Store: one connection in WAL mode with synchronous=FULL, serialized
// by a mutex; concurrent writes share a transaction and its fsync (group commit). Every statement
// binds its parameters; no SQL is built from input.
#include <fcntl.h>
#include <sqlite3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <functional>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>
#include <unordered_map>

#include "backends.h"
#include "cortex/env.h"
#include "cortex/group_queue.h"
#include "cortex/log.h"
#include "cortex/store.h"
#include "rows.h"

namespace cortex {
namespace {

using json = nlohmann::json;
using store::CandidatesJson;
using store::ParseTags;
using store::TagsJson;

// 'CRTX': marks a file as ours so a foreign SQLite database is never written to.
constexpr int kApplicationId = 0x43525458;

// The attempts that are training data: finished, and neither interrupted (cortexd
// stopped) nor a crash (a health signal, not a reward). `A` is the table prefix. Both the
// outcome reader and the retrain window use it, so they always agree on what counts.
#define CORTEX_TRAINING_ATTEMPT(A) \
  A "outcome IS NOT NULL AND " A "outcome NOT IN ('interrupted','crash')"

// Each entry moves the schema one version up; never edit a released one, append.
const char* const kMigrations[] = {
    // v1
    R"sql(
CREATE TABLE tasks(
  id TEXT PRIMARY KEY,
  text TEXT NOT NULL,
  tags TEXT NOT NULL,
  state TEXT NOT NULL,
  created_at REAL NOT NULL,
  updated_at REAL NOT NULL,
  expert TEXT,
  feedback_quality REAL
);
CREATE INDEX tasks_created ON tasks(created_at);
CREATE INDEX tasks_state ON tasks(state);
CREATE TABLE decisions(
  task_id TEXT PRIMARY KEY REFERENCES tasks(id),
  time REAL NOT NULL,
  model_version TEXT NOT NULL,
  chosen TEXT NOT NULL,
  chosen_confidence REAL NOT NULL,
  propensity REAL NOT NULL,
  explored INTEGER NOT NULL,
  forced INTEGER NOT NULL,
  candidates TEXT NOT NULL
);
CREATE INDEX decisions_chosen ON decisions(chosen);
CREATE TABLE attempts(
  task_id TEXT NOT NULL REFERENCES tasks(id),
  n INTEGER NOT NULL,
  expert TEXT NOT NULL,
  started_at REAL NOT NULL,
  finished_at REAL,
  outcome TEXT,
  quality REAL,
  duration_s REAL,
  output TEXT,
  error TEXT,
  PRIMARY KEY(task_id, n)
);
CREATE INDEX attempts_expert ON attempts(expert);
CREATE TABLE feedback(
  id INTEGER PRIMARY KEY,
  task_id TEXT NOT NULL REFERENCES tasks(id),
  time REAL NOT NULL,
  quality REAL NOT NULL,
  note TEXT NOT NULL
);
CREATE INDEX feedback_task ON feedback(task_id);
CREATE TABLE expert_events(
  id INTEGER PRIMARY KEY,
  time REAL NOT NULL,
  expert TEXT NOT NULL,
  file TEXT NOT NULL,
  event TEXT NOT NULL,
  detail TEXT NOT NULL
);
)sql",
    // v2: the learning router. Decisions keep their greedy pick (for off-policy
    // evaluation); every trained model version is kept with its metrics and weights.
    R"sql(
ALTER TABLE decisions ADD COLUMN greedy TEXT;
CREATE TABLE models(
  version INTEGER PRIMARY KEY,
  created REAL NOT NULL,
  status TEXT NOT NULL,
  live INTEGER NOT NULL DEFAULT 0,
  trained_through INTEGER NOT NULL,
  metrics TEXT NOT NULL,
  weights BLOB NOT NULL
);
)sql",
    // v3: the poison-task guard. `routing` is set while a task is being routed; `deaths`
    // counts the starts that found it routing or running; `error` says why a task ended
    // without an attempt that says so.
    R"sql(
ALTER TABLE tasks ADD COLUMN routing INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN deaths INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN error TEXT;
)sql",
    // v4: learning users can steer and reproduce. `learn` numbers every learning event
    // (a finished training attempt, a verdict that changes a reward) as it commits, the
    // order online learning consumes them in; `activations` says which version went live
    // from which event on; `checkpoints` keep an activation's weights every so many steps;
    // a decision names the activation and step that scored it; a verdict names who gave it
    // and which attempt it judged. Existing outcomes keep their order (attempt rowid), and
    // a model's trained_through is renumbered into the new sequence.
    R"sql(
ALTER TABLE feedback ADD COLUMN by TEXT NOT NULL DEFAULT '';
ALTER TABLE feedback ADD COLUMN n INTEGER NOT NULL DEFAULT 0;
CREATE INDEX feedback_by ON feedback(by, time);
ALTER TABLE decisions ADD COLUMN model_step INTEGER;
ALTER TABLE decisions ADD COLUMN model_live INTEGER;
CREATE TABLE learn(
  seq INTEGER PRIMARY KEY,
  task_id TEXT NOT NULL,
  n INTEGER NOT NULL,
  feedback INTEGER NOT NULL DEFAULT 0,
  reward REAL NOT NULL,
  time REAL NOT NULL
);
CREATE INDEX learn_attempt ON learn(task_id, n);
INSERT INTO learn(task_id,n,feedback,reward,time)
  SELECT task_id,n,0,CASE WHEN outcome='success' THEN quality ELSE 0 END,COALESCE(finished_at,0)
  FROM attempts WHERE outcome IS NOT NULL AND outcome NOT IN ('interrupted','crash')
  ORDER BY rowid;
UPDATE models SET trained_through=(SELECT count(*) FROM attempts a WHERE a.rowid<=models.trained_through
  AND a.outcome IS NOT NULL AND a.outcome NOT IN ('interrupted','crash'));
CREATE TABLE activations(
  id INTEGER PRIMARY KEY,
  version INTEGER NOT NULL,
  after_seq INTEGER NOT NULL,
  time REAL NOT NULL,
  reason TEXT NOT NULL
);
INSERT INTO activations(version,after_seq,time,reason)
  SELECT version,trained_through,created,'migrated' FROM models WHERE live=1;
CREATE TABLE checkpoints(
  activation INTEGER NOT NULL,
  step INTEGER NOT NULL,
  seq INTEGER NOT NULL,
  rng INTEGER NOT NULL,
  weights BLOB NOT NULL,
  PRIMARY KEY(activation, step)
);
)sql",
};
constexpr int kSchemaVersion = sizeof(kMigrations) / sizeof(kMigrations[0]);

// A prepared statement, reset on destruction so the cached handle can be reused.
class Stmt;

// A connection with its statement cache: the store has one that writes and, for a file,
// one that only reads.
struct Conn {
  sqlite3* db = nullptr;
  // By the address of the SQL text (a literal, so one lookup costs no copy or string
  // compare), with the text kept to check it against.
  std::unordered_map<const char*, std::pair<std::string, sqlite3_stmt*>> cache;
  ~Conn() {
    for (auto& [key, s] : cache) sqlite3_finalize(s.second);
    if (db) sqlite3_close(db);
  }
  std::string Err() const { return db ? sqlite3_errmsg(db) : "out of memory"; }
  Stmt Prepare(const char* sql);  // prepared once, then taken from the cache
  // One statement without results (BEGIN, SAVEPOINT, RELEASE, COMMIT), prepared once.
  Status Run(const char* sql);
};

class Stmt {
 public:
  Stmt(sqlite3_stmt* s) : s_(s) {}
  ~Stmt() {
    if (s_) {
      sqlite3_reset(s_);
      sqlite3_clear_bindings(s_);
    }
  }
  Stmt& Bind(int i, const std::string& v) {
    sqlite3_bind_text(s_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
    return *this;
  }
  Stmt& Bind(int i, const char* v) { return Bind(i, std::string(v)); }
  Stmt& Bind(int i, double v) {
    sqlite3_bind_double(s_, i, v);
    return *this;
  }
  Stmt& Bind(int i, int v) {
    sqlite3_bind_int64(s_, i, v);
    return *this;
  }
  Stmt& Bind(int i, long v) {
    sqlite3_bind_int64(s_, i, v);
    return *this;
  }
  Stmt& BindBlob(int i, const std::string& v) {
    sqlite3_bind_blob(s_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
    return *this;
  }
  std::string Blob(int c) {
    const void* p = sqlite3_column_blob(s_, c);
    return p ? std::string(static_cast<const char*>(p),
                           static_cast<size_t>(sqlite3_column_bytes(s_, c)))
             : std::string();
  }
  Stmt& BindNull(int i) {
    sqlite3_bind_null(s_, i);
    return *this;
  }
  // SQLITE_ROW, SQLITE_DONE or an error code.
  int Step() { return sqlite3_step(s_); }
  std::string Text(int c) {
    const unsigned char* t = sqlite3_column_text(s_, c);
    return t ? std::string(reinterpret_cast<const char*>(t),
                           static_cast<size_t>(sqlite3_column_bytes(s_, c)))
             : std::string();
  }
  double Double(int c) { return sqlite3_column_double(s_, c); }
  long Long(int c) { return static_cast<long>(sqlite3_column_int64(s_, c)); }
  bool IsNull(int c) { return sqlite3_column_type(s_, c) == SQLITE_NULL; }
  bool ok() const { return s_ != nullptr; }

 private:
  sqlite3_stmt* s_;
};

Stmt Conn::Prepare(const char* sql) {
  auto it = cache.find(sql);
  if (it != cache.end() && it->second.first == sql) return Stmt(it->second.second);
  sqlite3_stmt* st = nullptr;
  if (sqlite3_prepare_v2(db, sql, -1, &st, nullptr) != SQLITE_OK) return Stmt(nullptr);
  if (it != cache.end()) {  // another text at the same address (not a literal): replace it
    sqlite3_finalize(it->second.second);
    it->second = {sql, st};
  } else {
    cache.emplace(sql, std::make_pair(std::string(sql), st));
  }
  return Stmt(st);
}

Status Conn::Run(const char* sql) {
  Stmt s = Prepare(sql);
  const int rc = s.ok() ? s.Step() : SQLITE_ERROR;
  return rc == SQLITE_DONE || rc == SQLITE_ROW ? Status::OK()
                                               : Status::IOError(std::string("store: ") + Err());
}

// A connection that only reads (query_only: a bug there cannot write) to the store's file,
// never through a symlink.
Status OpenReader(const std::string& path, const std::string& purpose, Conn* c) {
  if (sqlite3_open_v2(path.c_str(), &c->db,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_FULLMUTEX | SQLITE_OPEN_NOFOLLOW,
                      nullptr) != SQLITE_OK)
    return Status::IOError("cannot open store " + path + " " + purpose + ": " + c->Err());
  sqlite3_busy_timeout(c->db, 5000);
  sqlite3_extended_result_codes(c->db, 1);
  if (!c->Run("PRAGMA query_only=ON").ok())
    return Status::IOError("store " + path + ": " + c->Err());
  return Status::OK();
}

// A model as listed (no weights) from a row of
// "version,created,status,live,trained_through,metrics,length(weights)".
ModelRecord ListedModel(Stmt& s) {
  ModelRecord m;
  m.version = static_cast<int>(s.Long(0));
  m.created = s.Double(1);
  m.status = s.Text(2);
  m.live = s.Long(3) != 0;
  m.trained_through = s.Long(4);
  m.metrics = s.Text(5);
  m.weights_bytes = s.Long(6);
  return m;
}

class SqliteStore : public Store {
 public:
  explicit SqliteStore(std::string path) : path_(std::move(path)) {}
  ~SqliteStore() override {
    closing_reports_ = true;  // a report running is interrupted within 10,000 steps
    { std::lock_guard<std::mutex> wait(report_mu_); }
    if (checkpointer_.joinable()) {
      {
        std::lock_guard<std::mutex> l(checkpoint_mu_);
        closing_ = true;
      }
      checkpoint_cv_.notify_one();
      checkpointer_.join();
    }
    if (log_fd_ >= 0) ::close(log_fd_);
  }

  Status Open() {
    // Never through a symlink (the daemon has already checked the file and its folder; this
    // keeps a link planted since then from redirecting the open).
    int flags =
        SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX | SQLITE_OPEN_NOFOLLOW;
    if (sqlite3_open_v2(path_.c_str(), &write_.db, flags, nullptr) != SQLITE_OK)
      return Status::IOError("cannot open store " + path_ + ": " + Err());
    if (struct stat fst{}; path_ != ":memory:" && ::lstat(path_.c_str(), &fst) == 0)
      files_[0].dev = fst.st_dev, files_[0].ino = fst.st_ino;
    sqlite3_busy_timeout(write_.db, 5000);
    sqlite3_extended_result_codes(write_.db, 1);

    // Refuse anything that is not an empty file or a Cortex store before writing a byte.
    long app_id = 0, user_version = 0, objects = 0;
    Status st = QueryLong("PRAGMA application_id", &app_id);
    if (!st.ok()) return NotOurs(st.message());
    CORTEX_RETURN_IF_ERROR(QueryLong("PRAGMA user_version", &user_version));
    CORTEX_RETURN_IF_ERROR(QueryLong("SELECT count(*) FROM sqlite_master", &objects));
    if (app_id != kApplicationId && (objects > 0 || user_version != 0))
      return NotOurs("it holds another application's tables");
    // One of ours: check its pages before using it, so a damaged file is refused with a
    // clear message at start-up instead of failing writes later (and is never written).
    if (objects > 0) {
      std::string check;
      Status qc = QueryText("PRAGMA quick_check(1)", &check);
      if (!qc.ok() || check != "ok")
        return Status::Corruption("refusing to use " + path_ + ": the store is damaged (" +
                                  (qc.ok() ? check : qc.message()) +
                                  "); cortexd leaves it as it is: restore a backup, or try "
                                  "`sqlite3 " +
                                  path_ +
                                  " .recover`, or set store.path to a new "
                                  "file");
    }
    if (user_version > kSchemaVersion)
      return Status::FailedPrecondition("store " + path_ + " has schema version " +
                                        std::to_string(user_version) +
                                        ", newer than this cortexd understands (" +
                                        std::to_string(kSchemaVersion) + "); upgrade cortexd");

    if (path_ != ":memory:") {
      std::string mode;
      CORTEX_RETURN_IF_ERROR(QueryText("PRAGMA journal_mode=WAL", &mode));
      if (mode != "wal") return Status::IOError("store " + path_ + ": cannot enable WAL mode");
    }
    CORTEX_RETURN_IF_ERROR(Exec("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;"));
    CORTEX_RETURN_IF_ERROR(Migrate(static_cast<int>(user_version)));
    CORTEX_RETURN_IF_ERROR(StillOurFile());  // also notes the -wal and -shm files SQLite holds
    if (path_ != ":memory:") {
      // Commits that must reach the disk wait for it outside the writer's turn (WaitSynced):
      // SQLite commits without syncing, and one fdatasync of the write-ahead log, which
      // holds every commit since the last checkpoint, covers all commits made before it
      // began, while the next group is already being written. Where the log cannot be
      // opened for that, SQLite syncs each commit itself (synchronous=FULL).
      log_fd_ = ::open((path_ + "-wal").c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
      if (log_fd_ >= 0 && ::fsync(log_fd_) == 0) {
        const std::string dir = std::filesystem::path(path_).parent_path().string();
        if (int d = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            d >= 0) {
          (void)::fsync(d);  // the log's name, once
          ::close(d);
        }
        CORTEX_RETURN_IF_ERROR(Exec("PRAGMA synchronous=NORMAL"));
        // A log started over is cut back to this size (the writer restarts it every
        // kRestartPages pages, ~256 MiB).
        CORTEX_RETURN_IF_ERROR(Exec("PRAGMA journal_size_limit=268435456"));
      } else if (log_fd_ >= 0) {
        ::close(log_fd_);
        log_fd_ = -1;
      }
      // The same file, for reads only.
      CORTEX_RETURN_IF_ERROR(OpenReader(path_, "for reading", &read_));
      // Checkpoints (the log copied into the database file) on a connection and thread
      // of their own: SQLite would run each inside whichever commit takes the log past
      // 1000 pages, holding every writer queued behind it for milliseconds.
      if (sqlite3_open_v2(path_.c_str(), &checkpoint_.db,
                          SQLITE_OPEN_READWRITE | SQLITE_OPEN_FULLMUTEX | SQLITE_OPEN_NOFOLLOW,
                          nullptr) != SQLITE_OK)
        return Status::IOError("cannot open store " + path_ +
                               " to checkpoint: " + checkpoint_.Err());
      sqlite3_busy_timeout(checkpoint_.db, 5000);
      sqlite3_wal_hook(write_.db, &SqliteStore::OnCommit, this);  // (replaces SQLite's own)
      checkpointer_ = std::thread([this] { CheckpointLoop(); });
    }
    return Status::OK();
  }

  static int OnCommit(void* self, sqlite3*, const char*, int log_pages) {
    if (log_pages >= kCheckpointPages) {
      auto* s = static_cast<SqliteStore*>(self);
      if (log_pages >= kRestartPages) s->restart_due_ = true;
      {
        std::lock_guard<std::mutex> l(s->checkpoint_mu_);
        s->checkpoint_due_ = true;
      }
      s->checkpoint_cv_.notify_one();
    }
    return SQLITE_OK;
  }

  void CheckpointLoop() {
    std::unique_lock<std::mutex> l(checkpoint_mu_);
    while (true) {
      checkpoint_cv_.wait(l, [&] { return checkpoint_due_ || closing_; });
      if (closing_) return;
      checkpoint_due_ = false;
      l.unlock();
      // PASSIVE: it copies what it can without waiting for readers or the writer, which
      // go on meanwhile; the writer starts the log over once a checkpoint has copied all.
      if (int rc = sqlite3_wal_checkpoint_v2(checkpoint_.db, nullptr, SQLITE_CHECKPOINT_PASSIVE,
                                             nullptr, nullptr);
          rc != SQLITE_OK && rc != SQLITE_BUSY)
        LogWarn("store: checkpoint failed: {}", checkpoint_.Err());
      l.lock();
    }
  }

  Status InsertTask(const Task& t) override {
    const std::string tags = TagsJson(t.tags).dump();  // outside the writer's turn
    return Commit([&] { return WriteTask(t, tags, t.state, t.created_at); });
  }

  // A new task row, in `state` as of `updated_at` (an admission writes the state its
  // decision and first attempt leave it in at once, not each step's).
  Status WriteTask(const Task& t, const std::string& tags, TaskState state, double updated_at) {
    Stmt s =
        Prepare("INSERT INTO tasks(id,text,tags,state,created_at,updated_at) VALUES(?,?,?,?,?,?)");
    s.Bind(1, t.id).Bind(2, t.text).Bind(3, tags).Bind(4, ToString(state));
    s.Bind(5, t.created_at).Bind(6, updated_at);
    return Done(s, "insert task " + t.id);
  }

  void Admit(const std::vector<Admission>& batch, std::vector<Status>* out) override {
    std::vector<std::string> tags, cands;  // serialized before taking the writer's turn
    for (const Admission& a : batch) {
      tags.push_back(TagsJson(a.task->tags).dump());
      cands.push_back(a.decision ? CandidatesJson(*a.decision).dump() : std::string());
    }
    std::vector<std::function<Status()>> writes;
    std::vector<bool> durable;
    for (size_t i = 0; i < batch.size(); ++i) {
      durable.push_back(batch[i].durable);
      writes.push_back([&, i] {
        const Admission& a = batch[i];
        if (!a.decision) return WriteTask(*a.task, tags[i], a.task->state, a.task->created_at);
        const TaskState state = a.started.empty() ? TaskState::kRouted : TaskState::kRunning;
        CORTEX_RETURN_IF_ERROR(WriteTask(*a.task, tags[i], state, a.decision->time));
        CORTEX_RETURN_IF_ERROR(InsertDecision(a.task->id, *a.decision, cands[i]));
        if (a.started.empty()) return Status::OK();
        return InsertAttempt(a.task->id, 1, a.started, a.decision->time);
      });
    }
    *out = CommitEach(writes, durable);
  }

  void RecordDecisions(const std::vector<std::pair<std::string, const Decision*>>& batch,
                       std::vector<Status>* out) override {
    std::vector<std::string> cands;  // serialized before taking the writer's turn
    for (const auto& [id, d] : batch) cands.push_back(CandidatesJson(*d).dump());
    std::vector<std::function<Status()>> writes;
    for (size_t i = 0; i < batch.size(); ++i)
      writes.push_back(
          [&, i] { return WriteDecision(batch[i].first, *batch[i].second, cands[i]); });
    *out = CommitEach(writes);
  }

  Status WriteDecision(const std::string& id, const Decision& d, const std::string& cands) {
    CORTEX_RETURN_IF_ERROR(InsertDecision(id, d, cands));
    return UpdateState(id, TaskState::kRouted, d.time);
  }

  Status InsertDecision(const std::string& id, const Decision& d, const std::string& cands) {
    const Candidate* chosen = d.Find(d.chosen);
    Stmt s = Prepare(
        "INSERT OR REPLACE INTO decisions(task_id,time,model_version,chosen,chosen_confidence,"
        "propensity,explored,forced,candidates,greedy,model_step,model_live) "
        "VALUES(?,?,?,?,?,?,?,?,?,?,?,?)");
    s.Bind(1, id).Bind(2, d.time).Bind(3, d.model_version).Bind(4, d.chosen);
    s.Bind(5, chosen ? chosen->confidence : 0.0).Bind(6, d.propensity);
    s.Bind(7, d.explored ? 1 : 0).Bind(8, d.forced ? 1 : 0).Bind(9, cands);
    s.Bind(10, d.greedy);
    if (d.model_step >= 0)
      s.Bind(11, d.model_step).Bind(12, d.model_live);
    else
      s.BindNull(11).BindNull(12);
    return Done(s, "record decision for " + id);
  }

  void StartAttempts(const std::vector<AttemptStart>& batch, std::vector<Status>* out) override {
    std::vector<std::function<Status()>> writes;
    for (const AttemptStart& a : batch)
      writes.push_back([&] { return WriteStart(a.id, a.n, a.expert, a.time); });
    *out = CommitEach(writes);
  }

  Status WriteStart(const std::string& id, int n, const std::string& expert, double time) {
    CORTEX_RETURN_IF_ERROR(InsertAttempt(id, n, expert, time));
    return UpdateState(id, TaskState::kRunning, time);
  }

  Status InsertAttempt(const std::string& id, int n, const std::string& expert, double time) {
    Stmt s = Prepare("INSERT INTO attempts(task_id,n,expert,started_at) VALUES(?,?,?,?)");
    s.Bind(1, id).Bind(2, n).Bind(3, expert).Bind(4, time);
    return Done(s, "start attempt");
  }

  void FinishAttempts(const std::vector<AttemptEnd>& batch, std::vector<Status>* out) override {
    std::vector<std::function<Status()>> writes;
    for (const AttemptEnd& a : batch) writes.push_back([&] { return WriteFinish(a); });
    *out = CommitEach(writes);
  }

  Status WriteFinish(const AttemptEnd& a) {
    const Outcome& o = *a.outcome;
    const std::string& id = a.id;
    Stmt s = Prepare(
        "UPDATE attempts SET finished_at=?,outcome=?,quality=?,duration_s=?,output=?,error=? "
        "WHERE task_id=? AND n=?");
    s.Bind(1, a.time).Bind(2, ToString(o.kind)).Bind(3, o.quality).Bind(4, o.duration_s);
    s.Bind(5, o.output).Bind(6, o.error).Bind(7, id).Bind(8, a.n);
    CORTEX_RETURN_IF_ERROR(Done(s, "finish attempt"));
    CORTEX_RETURN_IF_ERROR(Changed("attempt " + std::to_string(a.n) + " of task " + id));
    if (store::IsTrainingOutcome(o.kind)) {
      // The next learning event: one writer, so seq order is commit order.
      Stmt l = Prepare("INSERT INTO learn(task_id,n,feedback,reward,time) VALUES(?,?,0,?,?)");
      l.Bind(1, id).Bind(2, a.n).Bind(3, store::OutcomeReward(o)).Bind(4, a.time);
      CORTEX_RETURN_IF_ERROR(Done(l, "log outcome for learning"));
    }
    if (!a.ends) {  // it waits for its next attempt: routed, so a restart resumes it
      Stmt r =
          Prepare("UPDATE tasks SET state='routed',updated_at=? WHERE id=? AND state='running'");
      r.Bind(1, a.time).Bind(2, id);
      return Done(r, "finish attempt");
    }
    // The attempt's expert is the one that ended the task.
    Stmt e = Prepare(
        "UPDATE tasks SET state=?,updated_at=?,expert=(SELECT expert FROM attempts WHERE "
        "task_id=?3 AND n=?4) WHERE id=?3");
    e.Bind(1, ToString(*a.ends)).Bind(2, a.time).Bind(3, id).Bind(4, a.n);
    CORTEX_RETURN_IF_ERROR(Done(e, "finish task"));
    return Changed("task " + id);
  }

  Status UndoStart(const std::string& id, int n) override {
    return Commit([&] {
      Stmt d = Prepare("DELETE FROM attempts WHERE task_id=? AND n=? AND outcome IS NULL");
      d.Bind(1, id).Bind(2, n);
      CORTEX_RETURN_IF_ERROR(Done(d, "undo attempt"));
      CORTEX_RETURN_IF_ERROR(Changed("open attempt " + std::to_string(n) + " of task " + id));
      Stmt t = Prepare("UPDATE tasks SET state='routed' WHERE id=? AND state='running'");
      t.Bind(1, id);
      CORTEX_RETURN_IF_ERROR(Done(t, "undo attempt"));
      return Changed("running task " + id);
    });
  }

  Status FinishTask(const std::string& id, TaskState state, const std::string& expert,
                    double time) override {
    return Commit([&] { return WriteEnd(id, state, expert, time); });
  }

  Status WriteEnd(const std::string& id, TaskState state, const std::string& expert, double time) {
    Stmt s = Prepare("UPDATE tasks SET state=?,expert=?,updated_at=? WHERE id=?");
    s.Bind(1, ToString(state)).Bind(2, expert).Bind(3, time).Bind(4, id);
    CORTEX_RETURN_IF_ERROR(Done(s, "finish task"));
    return Changed("task " + id);
  }

  Status SetState(const std::string& id, TaskState state, double time) override {
    return Commit([&] { return UpdateState(id, state, time); });
  }

  Status AddFeedback(const std::string& id, const Feedback& f, int per_hour,
                     FeedbackResult* out) override {
    return Commit([&] {
      Stmt t = Prepare("SELECT 1 FROM tasks WHERE id=?");
      t.Bind(1, id);
      if (t.Step() != SQLITE_ROW) return Status::NotFound("no task with id '" + id + "'");
      // The attempt judged: the task's last finished one that is training data (an
      // interrupted or crashed attempt says nothing about the expert's answer).
      Stmt a = Prepare(
          "SELECT n,expert,outcome FROM attempts WHERE task_id=? AND " CORTEX_TRAINING_ATTEMPT(
              "") " ORDER BY n DESC LIMIT 1");
      a.Bind(1, id);
      if (a.Step() != SQLITE_ROW)
        return Status::FailedPrecondition(
            "task " + id +
            " never finished an attempt (interrupted or crashed ones do not count): "
            "there is nothing to judge");
      *out = FeedbackResult{};
      out->attempt = static_cast<int>(a.Long(0));
      out->expert = a.Text(1);
      const bool training = store::IsTrainingOutcome(a.Text(2));
      if (per_hour > 0) {
        Stmt c = Prepare("SELECT count(*) FROM feedback WHERE by=? AND time>?");
        c.Bind(1, f.by).Bind(2, f.time - 3600);
        if (c.Step() == SQLITE_ROW && c.Long(0) >= per_hour)
          return Status::ResourceExhausted(store::FeedbackBoundMessage(f.by, per_hour));
      }
      // The reward before and after: the mean of every person's latest verdict.
      auto reward = [&](double* r) {
        Stmt m = Prepare(
            "SELECT avg(quality) FROM feedback WHERE id IN (SELECT max(id) FROM feedback "
            "WHERE task_id=?1 AND n=?2 GROUP BY by)");
        m.Bind(1, id).Bind(2, out->attempt);
        if (m.Step() != SQLITE_ROW) return Status::IOError("feedback: " + write_.Err());
        if (!m.IsNull(0)) *r = m.Double(0);
        return Status::OK();
      };
      double before = -1;
      CORTEX_RETURN_IF_ERROR(reward(&before));
      Stmt i = Prepare("INSERT INTO feedback(task_id,time,quality,note,by,n) VALUES(?,?,?,?,?,?)");
      i.Bind(1, id).Bind(2, f.time).Bind(3, f.quality).Bind(4, f.note).Bind(5, f.by);
      i.Bind(6, out->attempt);
      CORTEX_RETURN_IF_ERROR(Done(i, "feedback"));
      out->reward = f.quality;
      CORTEX_RETURN_IF_ERROR(reward(&out->reward));
      Stmt u = Prepare("UPDATE tasks SET feedback_quality=? WHERE id=?");
      u.Bind(1, out->reward).Bind(2, id);
      CORTEX_RETURN_IF_ERROR(Done(u, "feedback"));
      if (!training || out->reward == before) return Status::OK();
      Stmt l = Prepare("INSERT INTO learn(task_id,n,feedback,reward,time) VALUES(?,?,1,?,?)");
      l.Bind(1, id).Bind(2, out->attempt).Bind(3, out->reward).Bind(4, f.time);
      CORTEX_RETURN_IF_ERROR(Done(l, "log feedback for learning"));
      out->learn_seq = static_cast<long>(sqlite3_last_insert_rowid(write_.db));
      return Status::OK();
    });
  }

  Status GetTask(const std::string& id, Task* t) override {
    Reading r(*this);
    // One snapshot: the task's row, decision and attempts as of one commit.
    CORTEX_RETURN_IF_ERROR(r.Run("BEGIN"));
    Status st = LoadTask(r, id, t);
    (void)r.Run("COMMIT");
    return st;
  }

  Status ResolveTaskId(const std::string& prefix, std::string* id) override {
    Reading r(*this);
    // Ids are ASCII: every id starting with the prefix sorts in [prefix, prefix + 0xff).
    Stmt s = r.Prepare("SELECT id FROM tasks WHERE id>=?1 AND id<?2 ORDER BY id LIMIT 3");
    s.Bind(1, prefix).Bind(2, prefix + "\xff");
    std::vector<std::string> found;
    int rc;
    while ((rc = s.Step()) == SQLITE_ROW) found.push_back(s.Text(0));
    if (rc != SQLITE_DONE) return r.Fail("resolving a task id");
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
    rows->clear();
    Stmt s = r.Prepare(
        "SELECT t.id,t.created_at,t.text,t.state,COALESCE(d.chosen,''),"
        "COALESCE(d.chosen_confidence,0),COALESCE(d.explored,0),"
        "(SELECT outcome FROM attempts a WHERE a.task_id=t.id ORDER BY n DESC LIMIT 1),"
        "COALESCE(t.feedback_quality,(SELECT quality FROM attempts a WHERE a.task_id=t.id "
        "ORDER BY n DESC LIMIT 1)),"
        // The confidence the decision gave the expert that ended the task.
        "COALESCE(NULLIF(t.expert,''),d.chosen,''),"
        "(SELECT json_extract(c.value,'$.confidence') FROM json_each(d.candidates) c "
        "WHERE json_extract(c.value,'$.expert')=COALESCE(NULLIF(t.expert,''),d.chosen)),t.rowid "
        "FROM tasks t LEFT JOIN decisions d ON d.task_id=t.id "
        "WHERE (?1='' OR d.chosen=?1 OR t.expert=?1) AND t.created_at>=?2 AND t.rowid>?5 "
        // An outcome kind matches the outcome of the task's last attempt; cancelled and
        // interrupted match the task's state (a task can end so without an attempt).
        "AND (?3='' OR t.state=?3 OR (t.state IN ('succeeded','failed') AND "
        "(SELECT outcome FROM attempts a WHERE a.task_id=t.id ORDER BY n DESC LIMIT 1)=?3)) "
        // The store's order, not the clocks': a task stamped by a wrong clock is not
        // hidden behind (or kept above) the others.
        "ORDER BY t.rowid DESC LIMIT ?4");
    s.Bind(1, q.expert).Bind(2, q.since).Bind(3, q.outcome).Bind(4, q.limit).Bind(5, q.after_seq);
    int rc;
    while ((rc = s.Step()) == SQLITE_ROW) {
      HistoryRow r;
      r.id = s.Text(0);
      r.time = s.Double(1);
      r.text = s.Text(2);
      r.state = s.Text(3);
      r.chosen = s.Text(4);
      r.chosen_confidence = s.Double(5);
      r.explored = s.Long(6) != 0;
      r.expert = s.Text(9);
      r.confidence = s.IsNull(10) ? 0 : s.Double(10);
      r.seq = s.Long(11);
      TaskState st = ParseTaskState(r.state).value_or(TaskState::kQueued);
      // A cancelled task ended so whatever its last attempt said.
      r.outcome = st == TaskState::kCancelled ? "cancelled" : IsFinal(st) ? s.Text(7) : "";
      r.quality = s.IsNull(8) || !IsFinal(st) ? -1 : s.Double(8);
      rows->push_back(std::move(r));
    }
    return rc == SQLITE_DONE ? Status::OK() : r.Fail("history");
  }

  Status Stats(std::vector<ExpertStats>* out) override {
    Reading r(*this);
    std::map<std::string, ExpertStats> m;
    {
      Stmt s = r.Prepare("SELECT chosen,count(*) FROM decisions GROUP BY chosen");
      while (s.Step() == SQLITE_ROW) m[s.Text(0)].routed = s.Long(1);
    }
    {
      // Feedback overrides the quality of the attempt that ended the task.
      Stmt s = r.Prepare(
          "SELECT a.expert,count(*),sum(a.outcome='success'),avg(CASE WHEN "
          "t.feedback_quality IS NOT NULL AND a.n=(SELECT max(n) FROM attempts b WHERE "
          "b.task_id=a.task_id) THEN t.feedback_quality ELSE a.quality END) "
          "FROM attempts a JOIN tasks t ON t.id=a.task_id "
          "WHERE a.outcome IS NOT NULL AND a.outcome!='interrupted' GROUP BY a.expert");
      while (s.Step() == SQLITE_ROW) {
        ExpertStats& e = m[s.Text(0)];
        e.attempts = s.Long(1);
        e.successes = s.Long(2);
        e.mean_quality = s.Double(3);
      }
    }
    {
      Stmt s = r.Prepare(
          "SELECT d.chosen,count(*),avg(d.chosen_confidence),avg(a.outcome='success'),"
          "avg((d.chosen_confidence-(a.outcome='success'))*(d.chosen_confidence-"
          "(a.outcome='success'))) FROM decisions d JOIN attempts a ON a.task_id=d.task_id "
          "AND a.n=1 WHERE a.outcome IS NOT NULL AND a.outcome!='interrupted' GROUP BY d.chosen");
      while (s.Step() == SQLITE_ROW) {
        ExpertStats& e = m[s.Text(0)];
        e.calibrated = s.Long(1);
        e.mean_confidence = s.Double(2);
        e.first_success_rate = s.Double(3);
        e.brier = s.Double(4);
      }
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
      Stmt s =
          Prepare("INSERT INTO expert_events(time,expert,file,event,detail) VALUES(?,?,?,?,?)");
      s.Bind(1, e.time).Bind(2, e.expert).Bind(3, e.file).Bind(4, e.event).Bind(5, e.detail);
      return Done(s, "expert event");
    });
  }

  Status ExpertEvents(int limit, std::vector<ExpertEvent>* out) override {
    Reading r(*this);
    out->clear();
    Stmt s = r.Prepare(
        "SELECT time,expert,file,event,detail FROM expert_events ORDER BY id DESC LIMIT ?");
    s.Bind(1, limit);
    while (s.Step() == SQLITE_ROW)
      out->push_back({s.Double(0), s.Text(1), s.Text(2), s.Text(3), s.Text(4)});
    return Status::OK();
  }

  Status ForEachTask(double since, const std::function<bool(const Task&)>& fn) override {
    long after = 0;
    for (;;) {
      std::vector<std::pair<long, std::string>> page;
      {
        Reading r(*this);
        Stmt s = r.Prepare(
            "SELECT rowid,id FROM tasks WHERE rowid>? AND created_at>=? ORDER BY rowid LIMIT 256");
        s.Bind(1, after).Bind(2, since);
        while (s.Step() == SQLITE_ROW) page.emplace_back(s.Long(0), s.Text(1));
      }
      if (page.empty()) return Status::OK();
      for (const auto& [rowid, id] : page) {
        Task t;
        CORTEX_RETURN_IF_ERROR(GetTask(id, &t));
        if (!fn(t)) return Status::OK();
        after = rowid;
      }
    }
  }

  // A learning event's row: seq, task, created, text, tags, expert, attempt, reward,
  // feedback, propensity, forced, candidates, greedy, explored, chosen. `reward` is the
  // event's own, or (`now`) the attempt's as of now.
  static std::string LearnSql(bool now, const std::string& where) {
    return std::string("SELECT l.seq,l.task_id,t.created_at,t.text,t.tags,a.expert,l.n,") +
           (now ? "COALESCE((SELECT reward FROM learn f WHERE f.task_id=l.task_id AND f.n=l.n "
                  "AND f.feedback=1 ORDER BY f.seq DESC LIMIT 1),l.reward)"
                : "l.reward") +
           ",l.feedback,COALESCE(d.propensity,1),COALESCE(d.forced,0),COALESCE(d.candidates,'[]'),"
           "d.greedy,COALESCE(d.explored,0),COALESCE(d.chosen,'') FROM learn l "
           "JOIN tasks t ON t.id=l.task_id JOIN attempts a ON a.task_id=l.task_id AND a.n=l.n "
           "LEFT JOIN decisions d ON d.task_id=l.task_id WHERE " +
           where + " ORDER BY l.seq";
  }
  static LoggedOutcome LearnRow(Stmt& s) {
    LoggedOutcome o;
    o.seq = s.Long(0);
    o.task_id = s.Text(1);
    o.time = s.Double(2);
    o.text = s.Text(3);
    o.tags = ParseTags(s.Text(4));
    o.expert = s.Text(5);
    o.attempt = static_cast<int>(s.Long(6));
    o.reward = s.Double(7);
    o.feedback = s.Long(8) != 0;
    o.propensity = o.attempt == 1 ? s.Double(9) : 1.0;
    o.forced = s.Long(10) != 0;
    store::ReadLoggedCandidates(json::parse(s.Text(11), nullptr, false), &o);
    o.greedy = s.IsNull(12) ? (s.Long(13) ? "" : s.Text(14)) : s.Text(12);
    return o;
  }

  Status ReadLearn(const char* sql, long a, long b,
                   const std::function<bool(const LoggedOutcome&)>& fn) {
    Reading r(*this, /*synced=*/false);
    Stmt s = r.Prepare(sql);
    s.Bind(1, a).Bind(2, b);
    int rc;
    while ((rc = s.Step()) == SQLITE_ROW)
      if (!fn(LearnRow(s))) return Status::OK();
    return rc == SQLITE_DONE ? Status::OK() : Status::IOError("read learning events: " + r.Err());
  }

  Status ForEachLearnEvent(long after_seq,
                           const std::function<bool(const LoggedOutcome&)>& fn) override {
    static const std::string sql = LearnSql(false, "l.seq>?1 AND ?2=?2");
    return ReadLearn(sql.c_str(), after_seq, 0, fn);
  }

  Status LearnEvents(long after_seq, long last_seq, long newest,
                     std::vector<LoggedOutcome>* out) override {
    out->clear();
    if (newest > 0) {  // where the newest `newest` begin: one index walk back from last_seq
      Reading r(*this, /*synced=*/false);
      Stmt s = r.Prepare(
          "SELECT seq FROM learn WHERE seq>? AND seq<=? ORDER BY seq DESC LIMIT 1 OFFSET ?");
      s.Bind(1, after_seq).Bind(2, last_seq).Bind(3, newest);
      int rc = s.Step();
      if (rc == SQLITE_ROW) after_seq = s.Long(0);
      if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        return Status::IOError("read learning events: " + r.Err());
    }
    static const std::string sql = LearnSql(false, "l.seq>?1 AND l.seq<=?2");
    return ReadLearn(sql.c_str(), after_seq, last_seq, [&](const LoggedOutcome& o) {
      out->push_back(o);
      return true;
    });
  }

  Status ForEachOutcome(long after_seq,
                        const std::function<bool(const LoggedOutcome&)>& fn) override {
    static const std::string sql = LearnSql(true, "l.seq>?1 AND l.feedback=0 AND ?2=?2");
    return ReadLearn(sql.c_str(), after_seq, 0, fn);
  }

  Status OutcomeWindowStart(long n, long* after_seq) override {
    Reading r(*this, /*synced=*/false);
    *after_seq = 0;
    Stmt s = r.Prepare("SELECT seq FROM learn WHERE feedback=0 ORDER BY seq DESC LIMIT 1 OFFSET ?");
    s.Bind(1, n);
    int rc = s.Step();
    if (rc == SQLITE_ROW) *after_seq = s.Long(0);
    return rc == SQLITE_ROW || rc == SQLITE_DONE ? Status::OK()
                                                 : Status::IOError("outcome window: " + r.Err());
  }

  Status NewestLearnSeq(long* any, long* outcome) override {
    Reading r(*this, /*synced=*/false);
    Stmt s = r.Prepare(
        "SELECT COALESCE(max(seq),0),COALESCE((SELECT max(seq) FROM learn WHERE feedback=0),0) "
        "FROM learn");
    if (s.Step() != SQLITE_ROW) return Status::IOError("newest learning event: " + r.Err());
    *any = s.Long(0);
    *outcome = s.Long(1);
    return Status::OK();
  }

  Status InsertActivation(int version, long after_seq, const std::string& reason, double time,
                          long* id) {
    Stmt a = Prepare("INSERT INTO activations(version,after_seq,time,reason) VALUES(?,?,?,?)");
    a.Bind(1, version).Bind(2, after_seq).Bind(3, time).Bind(4, reason);
    CORTEX_RETURN_IF_ERROR(Done(a, "record the live model"));
    if (id) *id = static_cast<long>(sqlite3_last_insert_rowid(write_.db));
    return Status::OK();
  }

  static Activation ActivationRow(Stmt& s) {
    return {s.Long(0), static_cast<int>(s.Long(1)), s.Long(2), s.Double(3), s.Text(4)};
  }

  Status LiveActivation(Activation* out) override {
    Reading r(*this);
    Stmt s = r.Prepare(
        "SELECT id,version,after_seq,time,reason FROM activations ORDER BY id DESC LIMIT 1");
    int rc = s.Step();
    if (rc == SQLITE_DONE) return Status::NotFound("no model was ever made live");
    if (rc != SQLITE_ROW) return Status::IOError("live model: " + r.Err());
    *out = ActivationRow(s);
    return Status::OK();
  }

  Status GetActivation(long id, Activation* out) override {
    Reading r(*this);
    Stmt s = r.Prepare("SELECT id,version,after_seq,time,reason FROM activations WHERE id=?");
    s.Bind(1, id);
    int rc = s.Step();
    if (rc == SQLITE_DONE) return Status::NotFound("no activation " + std::to_string(id));
    if (rc != SQLITE_ROW) return Status::IOError("activation: " + r.Err());
    *out = ActivationRow(s);
    return Status::OK();
  }

  Status SaveCheckpoint(const Checkpoint& c) override {
    return Commit([&] {
      Stmt s = Prepare(
          "INSERT OR IGNORE INTO checkpoints(activation,step,seq,rng,weights) VALUES(?,?,?,?,?)");
      s.Bind(1, c.activation).Bind(2, c.step).Bind(3, c.seq);
      s.Bind(4, static_cast<long>(c.rng)).BindBlob(5, c.weights);
      return Done(s, "save checkpoint");
    });
  }

  Status LoadCheckpoint(long activation, long max_step, Checkpoint* out) override {
    Reading r(*this);
    Stmt s = r.Prepare(
        "SELECT activation,step,seq,rng,weights FROM checkpoints WHERE activation=? AND step<=? "
        "ORDER BY step DESC LIMIT 1");
    s.Bind(1, activation).Bind(2, max_step);
    int rc = s.Step();
    if (rc == SQLITE_DONE) return Status::NotFound("no checkpoint");
    if (rc != SQLITE_ROW) return Status::IOError("load checkpoint: " + r.Err());
    out->activation = s.Long(0);
    out->step = s.Long(1);
    out->seq = s.Long(2);
    out->rng = static_cast<uint64_t>(s.Long(3));
    out->weights = s.Blob(4);
    return Status::OK();
  }

  Status PruneModels(int keep, std::vector<int>* deleted) override {
    deleted->clear();
    return Commit([&] {
      Stmt s = Prepare(
          "SELECT version FROM models WHERE status='refused' AND live=0 AND version NOT IN "
          "(SELECT version FROM activations) ORDER BY version DESC LIMIT -1 OFFSET ?");
      s.Bind(1, keep);
      while (s.Step() == SQLITE_ROW) deleted->push_back(static_cast<int>(s.Long(0)));
      for (int v : *deleted) {
        Stmt d = Prepare("DELETE FROM models WHERE version=?");
        d.Bind(1, v);
        CORTEX_RETURN_IF_ERROR(Done(d, "prune model versions"));
      }
      return Status::OK();
    });
  }

  Status SaveModel(const ModelRecord& m, long* activation) override {
    std::lock_guard<std::mutex> l(mu_);
    CORTEX_RETURN_IF_ERROR(StillOurFile());
    // Saved and made live in one transaction: a stop in between cannot leave a version
    // listed as promoted that never was live.
    CORTEX_RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE"));
    Status st;
    if (m.live) {
      Stmt a = Prepare("UPDATE models SET live=0 WHERE live=1");
      st = Done(a, "set live model");
    }
    if (st.ok()) {
      Stmt s = Prepare(
          "INSERT INTO models(version,created,status,live,trained_through,metrics,weights) "
          "VALUES(?,?,?,?,?,?,?)");
      s.Bind(1, m.version).Bind(2, m.created).Bind(3, m.status).Bind(4, m.live ? 1 : 0);
      s.Bind(5, m.trained_through).Bind(6, m.metrics).BindBlob(7, m.weights);
      st = Done(s, "save model v" + std::to_string(m.version));
    }
    if (st.ok() && m.live)
      st = InsertActivation(m.version, m.trained_through, "promoted", m.created, activation);
    return Finish(st);
  }

  Status SetLiveModel(int version, long after_seq, const std::string& reason, double time,
                      long* activation) override {
    std::lock_guard<std::mutex> l(mu_);
    CORTEX_RETURN_IF_ERROR(StillOurFile());
    CORTEX_RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE"));
    Stmt a = Prepare("UPDATE models SET live=0 WHERE live=1");
    Status st = Done(a, "set live model");
    if (st.ok() && version != 0) {  // 0: the untrained model, which has no row
      Stmt b = Prepare("UPDATE models SET live=1 WHERE version=?");
      b.Bind(1, version);
      st = Done(b, "set live model");
      if (st.ok() && sqlite3_changes(write_.db) == 0)
        st = Status::NotFound("no model version " + std::to_string(version));
    }
    if (st.ok()) st = InsertActivation(version, after_seq, reason, time, activation);
    return Finish(st);
  }

  Status ListModels(std::vector<ModelRecord>* out) override {
    Reading r(*this);
    out->clear();
    Stmt s = r.Prepare(
        "SELECT version,created,status,live,trained_through,metrics,length(weights) FROM models "
        "ORDER BY version");
    int rc;
    while ((rc = s.Step()) == SQLITE_ROW) out->push_back(ListedModel(s));
    return rc == SQLITE_DONE ? Status::OK() : Status::IOError("list models: " + r.Err());
  }

  Status LoadModel(int version, ModelRecord* m) override {
    Reading r(*this);
    Stmt s = r.Prepare(
        "SELECT version,created,status,live,trained_through,metrics,weights FROM models "
        "WHERE version=?");
    s.Bind(1, version);
    int rc = s.Step();
    if (rc == SQLITE_DONE) return Status::NotFound("no model version " + std::to_string(version));
    if (rc != SQLITE_ROW) return Status::IOError("load model: " + r.Err());
    m->version = static_cast<int>(s.Long(0));
    m->created = s.Double(1);
    m->status = s.Text(2);
    m->live = s.Long(3) != 0;
    m->trained_through = s.Long(4);
    m->metrics = s.Text(5);
    m->weights = s.Blob(6);
    m->weights_bytes = static_cast<long>(m->weights.size());
    return Status::OK();
  }

  Status MarkRouting(const std::vector<std::string>& ids) override {
    return Commit([&] {
      for (const auto& id : ids) {
        Stmt s = Prepare("UPDATE tasks SET routing=1 WHERE id=?");
        s.Bind(1, id);
        CORTEX_RETURN_IF_ERROR(Done(s, "mark task " + id + " as routing"));
      }
      return Status::OK();
    });
  }

  // Stamps are never before what they end (a clock set back across a restart).
  Status Recover(double time, bool crashed, Recovery* out) override {
    std::lock_guard<std::mutex> l(mu_);
    *out = Recovery{};
    CORTEX_RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE"));
    Status st;
    {
      Stmt d =
          Prepare("UPDATE tasks SET deaths=deaths+?,routing=0 WHERE routing=1 OR state='running'");
      d.Bind(1, crashed ? 1 : 0);
      st = Done(d, "count deaths");
    }
    if (st.ok()) {
      Stmt p = Prepare(
          "SELECT id FROM tasks WHERE state IN ('queued','routed') AND deaths>=? "
          "ORDER BY created_at, rowid");
      p.Bind(1, kPoisonDeaths);
      while (p.Step() == SQLITE_ROW) out->poisoned.push_back(p.Text(0));
      Stmt f = Prepare(
          "UPDATE tasks SET state='failed',updated_at=max(?,created_at),error=? WHERE state IN "
          "('queued','routed') AND deaths>=?");
      f.Bind(1, time).Bind(2, store::PoisonError()).Bind(3, kPoisonDeaths);
      st = Done(f, "fail poison tasks");
    }
    Stmt a = Prepare(
        "UPDATE attempts SET outcome='interrupted',finished_at=max(?,started_at),quality=0,"
        "error='cortexd stopped "
        "while this attempt ran' WHERE outcome IS NULL");
    a.Bind(1, time);
    if (st.ok()) st = Done(a, "recover attempts");
    if (st.ok()) {
      Stmt t = Prepare(
          "UPDATE tasks SET state='interrupted',updated_at=max(?,created_at) WHERE "
          "state='running'");
      t.Bind(1, time);
      st = Done(t, "recover tasks");
      out->interrupted = sqlite3_changes(write_.db);
    }
    CORTEX_RETURN_IF_ERROR(Finish(st));
    std::vector<std::string> ids;
    {
      Stmt s = Prepare(
          "SELECT id FROM tasks WHERE state IN ('queued','routed') ORDER BY created_at, rowid");
      while (s.Step() == SQLITE_ROW) ids.push_back(s.Text(0));
    }
    Reading w(*this, Reading::kWriterHeld);
    for (const auto& id : ids) {
      Task t;
      CORTEX_RETURN_IF_ERROR(LoadTask(w, id, &t));
      out->requeue.push_back(std::move(t));
    }
    return Status::OK();
  }

  Status Report(const ReportQuery& q, ReportData* out) override {
    *out = ReportData{};
    if (closing_reports_) return Status::Unavailable("cortexd is stopping");
    if (!read_.db) {  // ":memory:": its one connection
      Reading r(*this);
      CORTEX_RETURN_IF_ERROR(r.Run("BEGIN"));  // one snapshot: the plots agree
      Status st = ReportIn(r, q, out);
      (void)r.Run("COMMIT");
      return st;
    }
    // A report scans whole tables (seconds for a million tasks): on a connection of its
    // own, so no other read waits behind it; one report at a time; and interrupted when
    // the store closes, so it cannot hold up a stop.
    (void)Sync();  // what it reads is on the disk, as every read
    std::lock_guard<std::mutex> one(report_mu_);
    if (closing_reports_) return Status::Unavailable("cortexd is stopping");
    Conn c;
    CORTEX_RETURN_IF_ERROR(OpenReader(path_, "for a report", &c));
    sqlite3_progress_handler(
        c.db, 10000,
        [](void* self) { return static_cast<SqliteStore*>(self)->closing_reports_.load() ? 1 : 0; },
        this);
    struct OwnRead {
      Conn& c;
      Stmt Prepare(const char* sql) { return c.Prepare(sql); }
      Status Run(const char* sql) { return c.Run(sql); }
      Status Fail(const std::string& what) const { return Status::IOError(what + ": " + c.Err()); }
    } r{c};
    CORTEX_RETURN_IF_ERROR(r.Run("BEGIN"));  // one snapshot: the plots agree
    Status st = ReportIn(r, q, out);
    (void)r.Run("COMMIT");
    if (closing_reports_) return Status::Unavailable("cortexd is stopping: the report was ended");
    return st;
  }

  void StopReports() override { closing_reports_ = true; }

  template <class Read>  // (Reading is declared further down)
  Status ReportIn(Read& r, const ReportQuery& q, ReportData* out) {
    // The window: as asked, else from the first task (or, with none, the first event or
    // model) to the last thing that happened in it, so that the plots span the activity.
    const double now = Env::Default()->NowUnix();
    double since = q.since, until = q.until;
    if (since <= 0) {
      Stmt s = r.Prepare(
          "SELECT coalesce((SELECT min(created_at) FROM tasks),"
          "(SELECT min(t) FROM (SELECT min(time) t FROM expert_events UNION ALL "
          "SELECT min(created) FROM models)))");
      since = s.Step() == SQLITE_ROW && !s.IsNull(0) ? s.Double(0) : now;
      if (until > 0) since = std::min(since, until);  // a window that ends before it all
    }
    if (until <= 0) {
      Stmt s = r.Prepare(
          "SELECT max(t) FROM (SELECT max(updated_at) t FROM tasks WHERE created_at>=?1 "
          "UNION ALL SELECT max(time) FROM expert_events WHERE time>=?1 "
          "UNION ALL SELECT max(created) FROM models WHERE created>=?1)");
      s.Bind(1, since);
      until = s.Step() == SQLITE_ROW && !s.IsNull(0) ? s.Double(0) : since;
    }
    until = std::max(until, since);
    {
      Stmt s = r.Prepare("SELECT count(*) FROM tasks WHERE created_at>=?1 AND created_at<=?2");
      s.Bind(1, since).Bind(2, until);
      if (s.Step() == SQLITE_ROW) out->tasks = s.Long(0);
    }
    const size_t n = store::SizeReport(q, since, until, out);
    auto bucket = [&](long b) { return store::Bucket(*out, b); };
    auto bind = [&](Stmt& s) { s.Bind(1, since).Bind(2, until).Bind(3, out->bucket_s); };
    {
      Stmt s = r.Prepare(
          "SELECT CAST((d.time-?1)/?3 AS INTEGER),count(*),"
          "sum(a.outcome IS NOT NULL AND a.outcome!='interrupted'),sum(a.outcome='success'),"
          "max(CAST(substr(d.model_version,2) AS INTEGER)) FROM decisions d "
          "LEFT JOIN attempts a ON a.task_id=d.task_id AND a.n=1 "
          "WHERE d.time>=?1 AND d.time<=?2 GROUP BY 1");
      bind(s);
      while (s.Step() == SQLITE_ROW) {
        const size_t b = bucket(s.Long(0));
        out->decided[b] += s.Long(1);
        out->first_done[b] += s.Long(2);
        out->first_ok[b] += s.Long(3);
        out->model_version[b] = std::max(out->model_version[b], static_cast<int>(s.Long(4)));
      }
    }
    {
      // Clamped: an older version stamped a task's end by a wall clock stepped back.
      Stmt s = r.Prepare(
          "SELECT CAST((updated_at-?1)/?3 AS INTEGER),count(*),sum(state='succeeded'),"
          "sum(max(updated_at-created_at,0)),max(max(updated_at-created_at,0)) FROM tasks "
          "WHERE created_at>=?1 AND updated_at<=?2 "
          "AND state IN ('succeeded','failed','cancelled','interrupted') GROUP BY 1");
      bind(s);
      std::vector<double> sum(n, 0);
      while (s.Step() == SQLITE_ROW) {
        const size_t b = bucket(s.Long(0));
        out->finished[b] += s.Long(1);
        out->succeeded[b] += s.Long(2);
        sum[b] += s.Double(3);
        out->latency_max[b] = std::max(out->latency_max[b], s.Double(4));
      }
      for (size_t b = 0; b < n; ++b)
        if (out->finished[b]) out->latency_mean[b] = sum[b] / out->finished[b];
    }
    // Counts per bucket by name, from rows of (bucket, name, count).
    auto named_series = [&](const char* sql) {
      std::map<std::string, std::vector<long>> by;
      Stmt s = r.Prepare(sql);
      bind(s);
      while (s.Step() == SQLITE_ROW) {
        auto& v = by[s.Text(1)];
        v.resize(n, 0);
        v[bucket(s.Long(0))] += s.Long(2);
      }
      return std::vector<std::pair<std::string, std::vector<long>>>(by.begin(), by.end());
    };
    out->share = named_series(
        "SELECT CAST((time-?1)/?3 AS INTEGER),chosen,count(*) FROM decisions "
        "WHERE time>=?1 AND time<=?2 GROUP BY 1,2");
    {
      store::CalibrationRows cal;
      Stmt s = r.Prepare(
          "SELECT d.chosen,min(CAST(d.chosen_confidence*10 AS INTEGER),9),count(*),"
          "avg(d.chosen_confidence),avg(a.outcome='success'),"
          "sum((d.chosen_confidence-(a.outcome='success'))*(d.chosen_confidence-"
          "(a.outcome='success'))) FROM decisions d JOIN attempts a ON a.task_id=d.task_id "
          "AND a.n=1 WHERE a.outcome IS NOT NULL AND a.outcome!='interrupted' "
          "AND d.time>=?1 AND d.time<=?2 GROUP BY 1,2");
      bind(s);
      while (s.Step() == SQLITE_ROW)
        cal.Add(s.Text(0), s.Long(1), s.Long(2), s.Double(3), s.Double(4), s.Double(5));
      cal.Finish(out);
    }
    {
      // The statement is built once (the statement cache is keyed by the SQL text's address).
      static const std::string sql = store::LatencySql("?1", "?2");
      Stmt s = r.Prepare(sql.c_str());
      s.Bind(1, since).Bind(2, until);
      while (s.Step() == SQLITE_ROW)
        out->latency_counts[std::min<size_t>(s.Long(0), out->latency_edges.size())] += s.Long(1);
    }
    {
      out->events = named_series(
          "SELECT CAST((time-?1)/?3 AS INTEGER),event,count(*) FROM expert_events "
          "WHERE time>=?1 AND time<=?2 GROUP BY 1,2");
      Stmt e = r.Prepare(
          "SELECT time,expert,file,event,detail FROM expert_events WHERE time>=?1 AND "
          "time<=?2 ORDER BY id DESC LIMIT 30");
      e.Bind(1, since).Bind(2, until);
      while (e.Step() == SQLITE_ROW)
        out->recent_events.push_back({e.Double(0), e.Text(1), e.Text(2), e.Text(3), e.Text(4)});
    }
    {
      Stmt s = r.Prepare(
          // (instr first: most decisions fire no rule, and reading their JSON is the cost)
          "SELECT rl.value,count(DISTINCT d.task_id) FROM decisions d,json_each(d.candidates) c,"
          "json_each(c.value,'$.rules') rl WHERE d.time>=?1 AND d.time<=?2 "
          "AND instr(d.candidates,'\"rules\":[\"')>0 "
          "GROUP BY 1 ORDER BY 2 DESC,1 LIMIT 20");
      s.Bind(1, since).Bind(2, until);
      while (s.Step() == SQLITE_ROW) out->rules.emplace_back(s.Text(0), s.Long(1));
    }
    {
      Stmt s = r.Prepare(
          "SELECT version,created,status,live,trained_through,metrics,length(weights) "
          "FROM models WHERE created>=?1 AND created<=?2 ORDER BY version");
      s.Bind(1, since).Bind(2, until);
      int rc;
      while ((rc = s.Step()) == SQLITE_ROW) out->models.push_back(ListedModel(s));
      if (rc != SQLITE_DONE) return r.Fail("report");
    }
    return Status::OK();
  }

  Status CountByState(std::vector<std::pair<std::string, long>>* counts) override {
    Reading r(*this);
    counts->clear();
    Stmt s = r.Prepare("SELECT state,count(*) FROM tasks GROUP BY state ORDER BY state");
    int rc;
    while ((rc = s.Step()) == SQLITE_ROW) counts->emplace_back(s.Text(0), s.Long(1));
    return rc == SQLITE_DONE ? Status::OK() : r.Fail("counting tasks");
  }

  Status Health() override {
    std::lock_guard<std::mutex> l(mu_);
    return StillOurFile();
  }

  Status Sync() override {
    uint64_t last;
    {
      std::lock_guard<std::mutex> l(sync_mu_);
      last = committed_;
    }
    return WaitSynced(last);
  }

  // Returns once commit number `seq` is on the disk: the first caller to find no sync
  // under way starts one that covers every commit so far; the others wait for it.
  Status WaitSynced(uint64_t seq) {
    if (log_fd_ < 0) return Status::OK();  // SQLite synced each commit itself
    std::unique_lock<std::mutex> l(sync_mu_);
    while (synced_ < seq) {
      // After a failed sync nothing since the last good one is known to be on the disk
      // (and a later sync may pass without it: Linux reports a lost write once).
      if (!sync_error_.ok()) return sync_error_;
      if (syncing_) {
        sync_cv_.wait(l);
        continue;
      }
      syncing_ = true;
      const uint64_t target = committed_;
      l.unlock();
      const int rc = ::fdatasync(log_fd_);
      const int err = errno;
      l.lock();
      syncing_ = false;
      if (rc == 0 && sync_error_.ok()) {
        synced_ = std::max(synced_, target);
      } else if (rc != 0) {
        // For good: every write from here on is refused (StillOurFile), as after a
        // store file deleted under cortexd.
        sync_error_ = Status::IOError(
            std::string("store: syncing the write-ahead log failed (") + strerror(err) +
            "): what was written since the last sync may not be on the disk; refusing "
            "writes until cortexd restarts");
      }
      sync_cv_.notify_all();
    }
    return Status::OK();
  }

  int SchemaVersion() override {
    std::lock_guard<std::mutex> l(mu_);
    long v = 0;
    (void)QueryLong("PRAGMA user_version", &v);
    return static_cast<int>(v);
  }
  std::string Path() const override { return path_; }

 private:
  std::string Err() const { return write_.Err(); }
  // The files that must stay the ones SQLite opened (StillOurFile): the database, and
  // the write-ahead log that holds the newest commits until a checkpoint with its -shm
  // index, both of which SQLite keeps open as long as the store. ino 0: not seen yet.
  struct Watched {
    const char* suffix;
    const char* name;
    const char* after_delete;
    const char* after_replace;
    dev_t dev;
    ino_t ino;
  };
  Watched files_[3] = {
      {"", "the store file", "Restart cortexd to make a new store (or restore it)",
       " into the old one. Restart cortexd to use the file that is there now", 0, 0},
      {"-wal", "the store's write-ahead log",
       "Restart cortexd (commits since the last checkpoint are gone with it)", ". Restart cortexd",
       0, 0},
      {"-shm", "the store's shared-memory index",
       "Restart cortexd (commits since the last checkpoint are gone with it)", ". Restart cortexd",
       0, 0}};
  Status Fail(const std::string& what) { return Status::IOError(what + ": " + Err()); }
  Status NotOurs(const std::string& why) {
    return Status::Corruption("refusing to use " + path_ + ": not a Cortex store (" + why +
                              "); move it away or set store.path to another file");
  }

  // The file we opened must still be the one at our path: writes into a deleted or
  // replaced file would be acknowledged and then lost, since nobody can find it again.
  Status StillOurFile() {
    {
      std::lock_guard<std::mutex> s(sync_mu_);
      if (!sync_error_.ok()) return sync_error_;
    }
    if (files_[0].ino == 0) return Status::OK();  // :memory:
    for (Watched& f : files_) {
      const std::string p = path_ + f.suffix;
      struct stat st {};
      if (::lstat(p.c_str(), &st) != 0) {
        if (f.ino == 0) continue;  // a side file not made yet
        return Status::IOError(std::string(f.name) + " " + p +
                               " was deleted while cortexd was running; refusing writes that "
                               "would be lost. " +
                               f.after_delete);
      }
      if (f.ino == 0) {
        f.dev = st.st_dev, f.ino = st.st_ino;
      } else if (st.st_ino != f.ino || st.st_dev != f.dev) {
        return Status::IOError(std::string(f.name) + " " + p +
                               " was replaced while cortexd was running; refusing writes" +
                               f.after_replace);
      }
    }
    return Status::OK();
  }

  // Group commit (leveldb's writer queue): a write joins the queue; the writer at its
  // front takes every write queued behind it (up to kMaxGroup), runs them in one
  // transaction, each in a savepoint of its own so one that fails is undone alone, and
  // commits once: one fsync (synchronous=FULL) for the group. Every write returns only
  // after the commit that holds it, with its own status; a failed commit fails them all.
  struct Write {
    const std::function<Status()>* fn = nullptr;
    bool durable = true;  // returns once its commit is on the disk
    uint64_t seq = 0;     // its commit's number
    Status result = Status::Internal("store: the write was not made");  // until its group's
  };
  static constexpr size_t kMaxGroup = 512;

  Status Commit(const std::function<Status()>& write) { return CommitEach({write})[0]; }

  // Several writes of one caller, each with its own status, in as few commits as the
  // queue allows (usually one).
  std::vector<Status> CommitEach(const std::vector<std::function<Status()>>& writes,
                                 const std::vector<bool>& durable = {}) {
    std::vector<Write> mine(writes.size());
    std::vector<Write*> items;
    for (size_t i = 0; i < writes.size(); ++i) {
      mine[i].fn = &writes[i];
      mine[i].durable = i >= durable.size() || durable[i];
      items.push_back(&mine[i]);
    }
    writers_.Run(items, [this](const std::vector<Write*>& group, const std::function<void()>&) {
      CommitGroup(group);
    });
    uint64_t wait_for = 0;
    for (const Write& w : mine)
      if (w.durable && w.result.ok()) wait_for = std::max(wait_for, w.seq);
    const Status synced = WaitSynced(wait_for);
    std::vector<Status> out;
    for (Write& w : mine)
      out.push_back(w.durable && w.result.ok() && !synced.ok() ? synced : std::move(w.result));
    return out;
  }

  // The writes of one group in one transaction. Writes almost never fail one by one, so
  // the group runs first without a savepoint per write; when one fails, that transaction
  // is rolled back and the group runs again with a savepoint each, so the failed write
  // is undone alone.
  void CommitGroup(const std::vector<Write*>& group) {
    std::lock_guard<std::mutex> l(mu_);
    Status st = StillOurFile();  // once per group, not per write
    if (!st.ok()) {
      for (Write* w : group) w->result = st;
      return;
    }
    if (group.size() == 1 || !TryGroup(group, /*isolated=*/false)) TryGroup(group, true);
    if (restart_due_.exchange(false)) {
      // The background checkpoints copy what they can, but never all of a log that a
      // writer appends to without pause, and SQLite starts the log over only once all of
      // it is copied: under sustained load it grew by gigabytes. Here, between two
      // groups, nothing is being written: this copies what is left (usually little), and
      // the next commit starts the log over from its beginning (if no reader still needs
      // it), truncated to journal_size_limit.
      (void)sqlite3_wal_checkpoint_v2(write_.db, nullptr, SQLITE_CHECKPOINT_PASSIVE, nullptr,
                                      nullptr);
    }
  }

  // One transaction over the group. Not `isolated`: returns false, having rolled back,
  // as soon as a write fails.
  bool TryGroup(const std::vector<Write*>& group, bool isolated) {
    const bool savepoints = isolated && group.size() > 1;
    Status st = Run("BEGIN IMMEDIATE");
    if (!st.ok()) {
      for (Write* w : group) w->result = st;
      return true;
    }
    bool any = false;
    Status lost;  // set when SQLite itself ended the transaction
    for (Write* w : group) {
      if (savepoints) (void)Run("SAVEPOINT w");
      w->result = (*w->fn)();
      // A full disk or an I/O error can make SQLite roll the whole transaction back at
      // once: the group's earlier writes are gone too, and later ones must not run
      // outside a transaction. Every write of the group fails, to be retried.
      if (sqlite3_get_autocommit(write_.db)) {
        lost =
            w->result.ok() ? Status::IOError("store: the transaction was rolled back") : w->result;
        break;
      }
      if (!w->result.ok() && !isolated) {
        (void)Run("ROLLBACK");
        return false;
      }
      if (savepoints) {
        if (!w->result.ok()) (void)Run("ROLLBACK TO w");
        (void)Run("RELEASE w");
      }
      any |= w->result.ok();
    }
    Status c = !lost.ok() ? lost : any ? Run("COMMIT") : Run("ROLLBACK");
    if (lost.ok() && any && c.ok()) {
      const uint64_t seq = NoteCommit();
      for (Write* w : group) w->seq = seq;
    }
    if (!lost.ok()) {
      for (Write* w : group) w->result = lost;
    } else if (!c.ok()) {
      (void)Run("ROLLBACK");
      for (Write* w : group)
        if (w->result.ok()) w->result = c;
    }
    return true;
  }

  Status Run(const char* sql) { return write_.Run(sql); }
  Status Exec(const char* sql) {
    char* err = nullptr;
    if (sqlite3_exec(write_.db, sql, nullptr, nullptr, &err) != SQLITE_OK) {
      std::string m = err ? err : Err();
      sqlite3_free(err);
      return Status::IOError(std::string("store: ") + m);
    }
    return Status::OK();
  }
  // Commits on success (and returns once that is on the disk), rolls back otherwise, and
  // returns the first error.
  Status Finish(const Status& st) {
    if (!st.ok()) {
      (void)Exec("ROLLBACK");
      return st;
    }
    CORTEX_RETURN_IF_ERROR(Exec("COMMIT"));
    return WaitSynced(NoteCommit());
  }

  uint64_t NoteCommit() {  // a commit was made: its number
    std::lock_guard<std::mutex> s(sync_mu_);
    return ++committed_;
  }
  Status QueryLong(const char* sql, long* out) {
    sqlite3_stmt* s = nullptr;
    if (sqlite3_prepare_v2(write_.db, sql, -1, &s, nullptr) != SQLITE_OK) return Fail(sql);
    int rc = sqlite3_step(s);
    if (rc == SQLITE_ROW) *out = static_cast<long>(sqlite3_column_int64(s, 0));
    sqlite3_finalize(s);
    return rc == SQLITE_ROW || rc == SQLITE_DONE ? Status::OK() : Fail(sql);
  }
  Status QueryText(const char* sql, std::string* out) {
    sqlite3_stmt* s = nullptr;
    if (sqlite3_prepare_v2(write_.db, sql, -1, &s, nullptr) != SQLITE_OK) return Fail(sql);
    int rc = sqlite3_step(s);
    if (rc == SQLITE_ROW) {
      const unsigned char* t = sqlite3_column_text(s, 0);
      *out = t ? reinterpret_cast<const char*>(t) : "";
    }
    sqlite3_finalize(s);
    return rc == SQLITE_ROW || rc == SQLITE_DONE ? Status::OK() : Fail(sql);
  }

  Status Migrate(int from) {
    for (int v = from; v < kSchemaVersion; ++v) {
      CORTEX_RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE"));
      Status st = Exec(kMigrations[v]);
      if (st.ok()) {
        std::string pragmas = "PRAGMA application_id=" + std::to_string(kApplicationId) +
                              "; PRAGMA user_version=" + std::to_string(v + 1) + ";";
        st = Exec(pragmas.c_str());
      }
      CORTEX_RETURN_IF_ERROR(
          Finish(st).WithContext("migrating store to v" + std::to_string(v + 1)));
    }
    return Status::OK();
  }

  Stmt Prepare(const char* sql) { return write_.Prepare(sql); }
  Status Done(Stmt& s, const std::string& what) {
    if (!s.ok()) return Fail("prepare " + what);
    int rc = s.Step();
    return rc == SQLITE_DONE || rc == SQLITE_ROW ? Status::OK() : Fail(what);
  }
  Status Changed(const std::string& what) {
    return sqlite3_changes(write_.db) > 0 ? Status::OK() : Status::NotFound("no " + what);
  }
  Status UpdateState(const std::string& id, TaskState state, double time) {
    Stmt s = Prepare("UPDATE tasks SET state=?,updated_at=?,routing=0 WHERE id=?");
    s.Bind(1, ToString(state)).Bind(2, time).Bind(3, id);
    CORTEX_RETURN_IF_ERROR(Done(s, "update task state"));
    return Changed("task with id '" + id + "'");
  }

  // A read, on the read connection (or, for ":memory:" and inside a write, the writer's).
  class Reading {
   public:
    enum Held { kWriterHeld };
    // A read sees what is on the disk: commits made so far are synced first (at once,
    // usually: only an admission waiting for its task's end is ever left unsynced).
    // `synced: false` for the trainer's reads of outcomes, which shows nothing to anyone
    // (and outcomes are durable writes: their commits are synced by their writers).
    explicit Reading(SqliteStore& s, bool synced = true) : c_(s.read_.db ? &s.read_ : &s.write_) {
      if (synced) (void)s.Sync();
      l_ = std::unique_lock<std::mutex>(s.read_.db ? s.read_mu_ : s.mu_);
    }
    Reading(SqliteStore& s, Held) : c_(&s.write_) {}  // the caller holds the writer's mutex
    Stmt Prepare(const char* sql) { return c_->Prepare(sql); }
    Status Run(const char* sql) { return c_->Run(sql); }
    std::string Err() const { return c_->Err(); }
    Status Fail(const std::string& what) const { return Status::IOError(what + ": " + Err()); }

   private:
    Conn* const c_;
    std::unique_lock<std::mutex> l_;
  };

  Status LoadTask(Reading& r, const std::string& id, Task* t) {
    *t = Task{};
    {
      Stmt s = r.Prepare(
          "SELECT id,text,tags,state,created_at,updated_at,COALESCE(expert,''),deaths,"
          "COALESCE(error,'') FROM tasks WHERE id=?");
      s.Bind(1, id);
      if (s.Step() != SQLITE_ROW) return Status::NotFound("no task with id '" + id + "'");
      t->id = s.Text(0);
      t->text = s.Text(1);
      t->tags = ParseTags(s.Text(2));
      t->state = ParseTaskState(s.Text(3)).value_or(TaskState::kQueued);
      t->created_at = s.Double(4);
      t->updated_at = s.Double(5);
      t->expert = s.Text(6);
      t->deaths = static_cast<int>(s.Long(7));
      t->error = s.Text(8);
    }
    {
      Stmt s = r.Prepare(
          "SELECT time,model_version,chosen,propensity,explored,forced,candidates,"
          "COALESCE(model_step,-1),COALESCE(model_live,0) FROM decisions WHERE task_id=?");
      s.Bind(1, id);
      if (s.Step() == SQLITE_ROW) {
        Decision d;
        d.time = s.Double(0);
        d.model_version = s.Text(1);
        d.chosen = s.Text(2);
        d.propensity = s.Double(3);
        d.explored = s.Long(4) != 0;
        d.forced = s.Long(5) != 0;
        d.candidates = store::ParseCandidates(json::parse(s.Text(6), nullptr, false));
        d.model_step = s.Long(7);
        d.model_live = s.Long(8);
        t->decision = std::move(d);
      }
    }
    {
      Stmt s = r.Prepare(
          "SELECT n,expert,started_at,COALESCE(finished_at,0),outcome,COALESCE(quality,0),"
          "COALESCE(duration_s,0),COALESCE(output,''),COALESCE(error,'') FROM attempts "
          "WHERE task_id=? ORDER BY n");
      s.Bind(1, id);
      while (s.Step() == SQLITE_ROW) {
        Attempt a;
        a.n = static_cast<int>(s.Long(0));
        a.expert = s.Text(1);
        a.started_at = s.Double(2);
        a.finished_at = s.Double(3);
        if (!s.IsNull(4)) {
          Outcome o;
          o.kind = ParseOutcomeKind(s.Text(4)).value_or(OutcomeKind::kFailure);
          o.quality = s.Double(5);
          o.duration_s = s.Double(6);
          o.output = s.Text(7);
          o.error = s.Text(8);
          a.outcome = std::move(o);
        }
        t->attempts.push_back(std::move(a));
      }
    }
    {
      Stmt s = r.Prepare("SELECT time,quality,note,by,n FROM feedback WHERE task_id=? ORDER BY id");
      s.Bind(1, id);
      while (s.Step() == SQLITE_ROW)
        t->feedback.push_back(
            {s.Double(0), s.Double(1), s.Text(2), s.Text(3), static_cast<int>(s.Long(4))});
    }
    return Status::OK();
  }

  std::string path_;
  Conn write_;
  std::mutex mu_;  // the connection; a group commit holds it for its whole transaction
  static constexpr int kCheckpointPages = 1000;  // log pages that make a checkpoint due
  // Log pages after which the writer finishes the checkpoint itself (CommitGroup).
  static constexpr int kRestartPages = 64000;
  std::atomic<bool> restart_due_{false};
  Conn checkpoint_;
  std::thread checkpointer_;
  std::mutex checkpoint_mu_;  // guards the two flags below
  std::condition_variable checkpoint_cv_;
  bool checkpoint_due_ = false, closing_ = false;
  // The write-ahead log, to sync it (WaitSynced); -1 when SQLite syncs each commit.
  int log_fd_ = -1;
  std::mutex sync_mu_;  // guards what follows; taken after mu_, never before it
  std::condition_variable sync_cv_;
  uint64_t committed_ = 0, synced_ = 0;  // commit numbers: the last made, the last on disk
  bool syncing_ = false;
  Status sync_error_;                     // set once a sync failed, for good
  GroupQueue<Write> writers_{kMaxGroup};  // writes waiting for their group's commit
  // Reads go through a connection of their own: in WAL mode they see the last commit
  // and never wait for a group's fsync. (":memory:" has one connection: reads share it.)
  Conn read_;  // destroyed before write_
  std::mutex read_mu_;
  std::mutex report_mu_;  // one report at a time, each on a connection of its own
  std::atomic<bool> closing_reports_{false};
};

}  // namespace

namespace {
// SQLite's own notices (a WAL recovered, frames dropped at a damaged one, a file
// that moved) go to cortexd's log: they are the only trace of data SQLite gave up on.
void SqliteLog(void*, int code, const char* msg) {
  const int primary = code & 0xff;
  if (primary == SQLITE_NOTICE || primary == SQLITE_WARNING)
    LogWarn("sqlite notice ({}): {}", code, msg);
  else if (primary != SQLITE_SCHEMA && primary != SQLITE_BUSY && primary != SQLITE_CONSTRAINT)
    LogWarn("sqlite error ({}): {}", code, msg);
}
}  // namespace

Result<std::unique_ptr<Store>> OpenSqliteStore(const std::string& path) {
  static std::once_flag logging;
  std::call_once(logging, [] {
    // Must precede SQLite's initialisation; if the process already used SQLite, it is
    // refused and the notices go unlogged.
    if (sqlite3_config(SQLITE_CONFIG_LOG, SqliteLog, nullptr) != SQLITE_OK)
      LogWarn("cannot route SQLite's notices to the log");
  });
  auto s = std::make_unique<SqliteStore>(path);
  Status st = s->Open();
  if (!st.ok()) return st;
  return std::unique_ptr<Store>(std::move(s));
}

}  // namespace cortex
