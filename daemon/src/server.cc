#include "server.h"

#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <pwd.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <set>
#include <thread>
#include <unordered_map>
#include <utility>

#include "cortex/env.h"
#include "cortex/log.h"
#include "cortex/protocol.h"
#include "cortex/tags.h"
#include "cortex/wire.h"

namespace cortex {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

int64_t NowUs() { return Env::Default()->MonotonicMicros(); }
// A connection must be silent at least this long before a new one may take its place.
constexpr double kEvictAfterSeconds = 1.0;

// Writes all of `s` to a socket that may be non-blocking; fails once a write makes no
// progress for `timeout_s` (<= 0: no limit).
bool SendAll(int fd, const std::string& s, double timeout_s) {
  size_t off = 0;
  const int64_t limit_us = timeout_s > 0 ? static_cast<int64_t>(std::min(timeout_s, 1e6) * 1e6) : 0;
  int64_t progress_us = NowUs();
  while (off < s.size()) {
    ssize_t w = send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w > 0) {
      off += static_cast<size_t>(w);
      progress_us = NowUs();
      continue;
    }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      int wait_ms = 1000;
      if (limit_us > 0) {
        const int64_t left = progress_us + limit_us - NowUs();
        if (left <= 0) return false;
        wait_ms = static_cast<int>(std::min<int64_t>((left + 999) / 1000, 1000));
      }
      pollfd p{fd, POLLOUT, 0};
      poll(&p, 1, wait_ms);
      continue;
    }
    return false;
  }
  return true;
}

Status Bad(const std::string& m) { return Status::InvalidArgument(m); }

// Field access with the request's own vocabulary in every error message.
class Request {
 public:
  Request(const json& j, std::string op) : j_(j), op_(std::move(op)) {}
  Status Allow(const std::vector<const char*>& fields) const {
    for (const auto& [k, _] : j_.items()) {
      bool ok = k == "op";
      for (const char* f : fields) ok = ok || k == f;
      if (!ok) {
        std::string list;
        for (const char* f : fields) list += (list.empty() ? "" : ", ") + std::string(f);
        return Bad("unknown field '" + Printable(k) + "' for op " + op_ +
                   (list.empty() ? " (it takes none)" : " (expected: " + list + ")"));
      }
    }
    return Status::OK();
  }
  bool Has(const char* k) const { return j_.contains(k) && !j_[k].is_null(); }
  Status String(const char* k, bool required, std::string* out) const {
    if (!Has(k))
      return required ? Bad("missing field '" + std::string(k) + "' for op " + op_) : Status::OK();
    if (!j_[k].is_string()) return Bad("field '" + std::string(k) + "' must be a string");
    *out = j_[k].get<std::string>();
    return Status::OK();
  }
  Status Number(const char* k, double lo, double hi, double* out) const {
    if (!Has(k)) return Status::OK();
    if (!j_[k].is_number()) return Bad("field '" + std::string(k) + "' must be a number");
    double v = j_[k].get<double>();
    if (!std::isfinite(v) || v < lo || v > hi)
      return Bad("field '" + std::string(k) + "' must be between " + fmt::format("{:g}", lo) +
                 " and " + fmt::format("{:g}", hi) + ", got " + fmt::format("{:g}", v));
    *out = v;
    return Status::OK();
  }
  Status Bool(const char* k, bool* out) const {
    if (!Has(k)) return Status::OK();
    if (!j_[k].is_boolean()) return Bad("field '" + std::string(k) + "' must be true or false");
    *out = j_[k].get<bool>();
    return Status::OK();
  }
  const json& raw() const { return j_; }

 private:
  const json& j_;
  std::string op_;
};

Status CheckText(const std::string& text, const DaemonConfig& lim) {
  if (text.find_first_not_of(" \t\r\n") == std::string::npos)
    return Bad("field 'text' is empty: a task needs a line of text");
  // Experts get the text as a C string (and in an environment variable): a NUL would cut
  // what runs short of what was routed and audited.
  if (size_t nul = text.find('\0'); nul != std::string::npos)
    return Bad(
        fmt::format("field 'text' holds a NUL character (at byte {}); task text cannot", nul));
  if (text.size() > lim.max_text_bytes)
    return Status::ResourceExhausted("task text is " + std::to_string(text.size()) +
                                     " bytes; the limit is " + std::to_string(lim.max_text_bytes) +
                                     " (daemon.max_text_bytes)");
  return Status::OK();
}

Status ParseTags(const Request& r, const DaemonConfig& lim, Tags* tags) {
  if (!r.Has("tags")) return Status::OK();
  const json& t = r.raw()["tags"];
  if (!t.is_object()) return Bad("field 'tags' must be an object of string values");
  if (static_cast<int>(t.size()) > lim.max_tags)
    return Status::ResourceExhausted(std::to_string(t.size()) + " tags; the limit is " +
                                     std::to_string(lim.max_tags) + " (daemon.max_tags)");
  std::map<std::string, std::string> names;  // TagKeyName -> the key that has it
  for (const auto& [k, v] : t.items()) {
    if (!ValidTagKey(k))
      return Bad("tag key '" + Printable(k) +
                 "' must be 1-64 characters of letters, digits, '_', '.', '-'");
    if (auto [it, fresh] = names.emplace(TagKeyName(k), k); !fresh)
      return Bad("tags '" + it->second + "' and '" + k +
                 "' differ only in case or in '.', '-', '_': experts would see one tag; give "
                 "one of them");
    if (!v.is_string()) return Bad("tag '" + Printable(k) + "' must have a string value");
    if (v.get<std::string>().size() > 4096) return Bad("tag '" + k + "' is longer than 4096 bytes");
    if (v.get<std::string>().find('\0') != std::string::npos)
      return Bad("tag '" + k + "' holds a NUL character; tag values cannot");
    // The repo tag, in any case, is `repo` (what every expert reads), and a path there is
    // the caller's: cortexd runs elsewhere, so a relative one would name another folder.
    if (TagKeyName(k) == "REPO") {
      const std::string& path = v.get<std::string>();
      if (!path.empty() && path[0] != '/')
        return Bad("tag repo must be an absolute path, not '" + Printable(path) +
                   "' (cortexd does not run in your folder; cortexctl makes it absolute)");
      tags->emplace_back("repo", path);
      continue;
    }
    tags->emplace_back(k, v.get<std::string>());
  }
  return Status::OK();
}

// A task's text and tags, as submit and route take them.
Status TaskArgs(const Request& r, const DaemonConfig& lim, std::string* text, Tags* tags) {
  CORTEX_RETURN_IF_ERROR(r.String("text", true, text));
  CORTEX_RETURN_IF_ERROR(CheckText(*text, lim));
  return ParseTags(r, lim, tags);
}

// A submit's fields (after Request::Allow): its task, and how long it waits (wait_s < 0:
// not at all; *timeout_s is set either way).
Status SubmitArgs(const Request& r, const DaemonConfig& lim, Submission* s, double* timeout_s) {
  CORTEX_RETURN_IF_ERROR(TaskArgs(r, lim, &s->text, &s->tags));
  bool wait = false;
  CORTEX_RETURN_IF_ERROR(r.Bool("wait", &wait));
  CORTEX_RETURN_IF_ERROR(r.Number("timeout_s", 0, 86400, timeout_s));
  s->wait_s = wait ? *timeout_s : -1;
  return Status::OK();
}

}  // namespace

// Who is at the other end of a connection: a user name, else "uid:N".
static std::string PeerUser(int fd) {
  struct ucred cred;
  socklen_t len = sizeof cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return "";
  struct passwd pw, *found = nullptr;
  std::vector<char> buf(4096);
  if (getpwuid_r(cred.uid, &pw, buf.data(), buf.size(), &found) == 0 && found)
    return found->pw_name;
  return "uid:" + std::to_string(cred.uid);
}

Status Server::CheckPeer(int fd) const {
  struct ucred cred;
  socklen_t len = sizeof cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0)
    return Status::PermissionDenied(std::string("cannot read peer credentials: ") +
                                    strerror(errno));
  if (cred.uid == geteuid() || cred.uid == 0) return Status::OK();
  if (!limits_.allow_group.empty()) {
    struct group* g = getgrnam(limits_.allow_group.c_str());
    if (g && cred.gid == g->gr_gid) return Status::OK();
    struct passwd* pw = getpwuid(cred.uid);
    if (g && pw) {
      std::vector<gid_t> groups(64);
      int n = static_cast<int>(groups.size());
      if (getgrouplist(pw->pw_name, cred.gid, groups.data(), &n) < 0 && n > 0) {
        groups.resize(static_cast<size_t>(n));
        getgrouplist(pw->pw_name, cred.gid, groups.data(), &n);
      }
      for (int i = 0; i < n && i < static_cast<int>(groups.size()); ++i)
        if (groups[static_cast<size_t>(i)] == g->gr_gid) return Status::OK();
    }
  }
  return Status::PermissionDenied(
      "uid " + std::to_string(cred.uid) + " may not use this cortexd: only uid " +
      std::to_string(geteuid()) +
      (limits_.allow_group.empty() ? std::string(" (set daemon.allow_group to admit a group)")
                                   : " and members of group '" + limits_.allow_group + "'"));
}

Status Server::TooLarge() const {
  return Status::ResourceExhausted("request is larger than " +
                                   std::to_string(limits_.max_request_bytes) +
                                   " bytes (daemon.max_request_bytes)");
}

// The connections' thread and the intake thread. Only the connections' thread touches a
// connection's state; others post messages to it (an eventfd wakes it once per burst).
// A connection serves one request at a time, in order: the next line is read only once
// the answer to the last one is written, as the protocol promises.
struct Server::Loop {
  explicit Loop(Server* server) : s(server) {}
  ~Loop() {
    if (ep >= 0) close(ep);
    if (efd >= 0) close(efd);
  }

  Status Start() {
    ep = epoll_create1(EPOLL_CLOEXEC);
    efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (ep < 0 || efd < 0) return Status::IOError(std::string("epoll: ") + strerror(errno));
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = 0;  // connections are numbered from 1
    if (epoll_ctl(ep, EPOLL_CTL_ADD, efd, &ev) != 0)
      return Status::IOError(std::string("epoll_ctl: ") + strerror(errno));
    try {
      io = std::thread([this] {
        pthread_setname_np(pthread_self(), "connections");
        Run();
      });
      intake = std::thread([this] {
        pthread_setname_np(pthread_self(), "intake");
        Intake();
      });
    } catch (const std::system_error& e) {
      Stop();
      return Status::Internal(std::string("cannot start the server's threads: ") + e.what());
    }
    return Status::OK();
  }

  // Ends both threads: connections close (those whose request runs on a thread of its own
  // once it has answered, 5 s at most).
  void Stop() {
    if (io.joinable()) {
      Post(Msg(Msg::kStop));
      io.join();
    }
    {
      std::lock_guard<std::mutex> l(intake_mu);
      intake_stop = true;
    }
    intake_cv.notify_all();
    if (intake.joinable()) intake.join();
  }

  // ---- messages into the connections' thread ---------------------------------------
  struct Msg {
    enum Kind { kConn, kAnswer, kEnded, kWatch, kSlowDone, kStop } kind;
    explicit Msg(Kind k) : kind(k) {}
    uint64_t conn = 0, req = 0;
    int fd = -1;                       // kConn
    std::string text;                  // kAnswer: the whole answer line
    std::shared_ptr<const Task> task;  // kEnded: the task as recorded (null: read it)
    std::string id;                    // kWatch
    std::shared_ptr<TaskWatch> watch;  // kWatch
    bool alive = true;                 // kSlowDone: the answer was written
  };
  void Post(Msg m) {
    bool wake;
    {
      std::lock_guard<std::mutex> l(mu);
      wake = inbox.empty();
      inbox.push_back(std::move(m));
    }
    if (wake) Wake();
  }
  void PostAll(std::vector<Msg>* ms) {
    if (ms->empty()) return;
    bool wake;
    {
      std::lock_guard<std::mutex> l(mu);
      wake = inbox.empty();
      for (auto& m : *ms) inbox.push_back(std::move(m));
    }
    ms->clear();
    if (wake) Wake();
  }
  void Wake() {
    const uint64_t one = 1;
    ssize_t w = write(efd, &one, sizeof one);
    (void)w;  // EAGAIN: the counter is already non-zero, a wake-up is pending anyway
  }

  // ---- the intake thread -----------------------------------------------------------
  // Submits read in one wake-up of the connections' thread go to the pipeline together
  // (and those that came meanwhile with them): one routing, one commit.
  struct Pending {
    uint64_t conn, req;
    Submission sub;
  };
  void Intake() {
    std::vector<Pending> batch;
    std::vector<Submission> subs;
    std::vector<Msg> answers;
    for (;;) {
      {
        std::unique_lock<std::mutex> l(intake_mu);
        intake_cv.wait(l, [&] { return !intake_queue.empty() || intake_stop; });
        if (intake_queue.empty()) return;
        batch.swap(intake_queue);
      }
      subs.clear();
      for (Pending& p : batch) {
        subs.push_back(std::move(p.sub));
        if (subs.back().wait_s < 0) continue;
        subs.back().on_end = [this, c = p.conn, r = p.req](std::shared_ptr<const Task> t) {
          Msg m{Msg::kEnded};
          m.conn = c;
          m.req = r;
          m.task = std::move(t);
          Post(std::move(m));
        };
      }
      try {
        s->h_->SubmitMany(&subs);
      } catch (const std::exception& e) {  // (out of memory): each is told, none is lost
        LogError("submitting {} task(s) failed: {}", subs.size(), e.what());
        for (Submission& sub : subs)
          if (sub.id.empty()) sub.result = Status::Internal(e.what());
      }
      for (size_t i = 0; i < batch.size(); ++i) {
        Submission& sub = subs[i];
        Msg m{sub.result.ok() && sub.wait_s >= 0 ? Msg::kWatch : Msg::kAnswer};
        m.conn = batch[i].conn;
        m.req = batch[i].req;
        if (!sub.result.ok())
          m.text = wire::Line(wire::Error(sub.result)) + "\n";
        else if (sub.wait_s < 0)
          m.text = wire::Line(wire::Ok({{"id", sub.id}, {"state", "queued"}})) + "\n";
        m.id = std::move(sub.id);
        m.watch = std::move(sub.watch);
        answers.push_back(std::move(m));
      }
      batch.clear();
      PostAll(&answers);
    }
  }

  // ---- the connections' thread -----------------------------------------------------
  struct Conn {
    uint64_t id = 0;
    int fd = -1;
    std::string user;           // the peer's user name (from its credentials)
    std::string in;             // read, not yet served (from `head` on)
    size_t head = 0;            // bytes of `in` served already
    size_t scanned = 0;         // `in` holds no newline before this
    bool later = false;         // in `later`: lines left when its turn ended
    std::string out;            // this thread's answer, not yet written
    bool discarding = false;    // inside an oversized line: skip to its end
    bool busy = false;          // a request is in progress (its answer not yet queued)
    bool slow = false;          // ... on a thread of its own, which owns the writes
    bool eof = false;           // the peer closed its side (or the connection broke)
    bool broken = false;        // nothing more can be written
    bool closing = false;       // close once the answer is out
    bool stalled = false;       // left unread: enough is buffered already
    bool out_armed = false;     // EPOLLOUT asked for
    uint64_t req = 0;           // the request in progress, numbered per connection
    int64_t last_done_us = 0;   // the last answer (or the start): the idle clock
    int64_t last_write_us = 0;  // the last byte of an answer written
    // A submit waiting for its task's end:
    int64_t deadline_us = 0;  // 0: none
    std::string wait_id;
    std::shared_ptr<TaskWatch> watch;
    bool ended_unread = false;  // it ended before its id came: read it once it does
  };

  void Run() {
    epoll_event events[256];
    std::vector<Msg> msgs;
    for (;;) {
      int timeout_ms = 1000;
      const int64_t now = NowUs();
      if (next_sweep_us > 0)
        timeout_ms =
            static_cast<int>(std::clamp<int64_t>((next_sweep_us - now + 999) / 1000, 0, 1000));
      if (shutting_down) timeout_ms = std::min(timeout_ms, 50);
      if (!later.empty()) timeout_ms = 0;
      int n = epoll_wait(ep, events, 256, timeout_ms);
      if (n < 0 && errno != EINTR) {
        LogError("epoll_wait: {}", strerror(errno));
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      for (int i = 0; i < n; ++i) {
        const uint64_t id = events[i].data.u64;
        if (id == 0) {
          uint64_t count;
          ssize_t r = read(efd, &count, sizeof count);
          (void)r;
          continue;
        }
        auto it = conns.find(id);
        if (it == conns.end()) continue;
        Conn& c = it->second;
        if (events[i].events & EPOLLOUT) Flush(c);
        const uint32_t e = events[i].events;
        if (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
          Read(c, (e & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0);
        Advance(id);
      }
      {
        std::lock_guard<std::mutex> l(mu);
        msgs.swap(inbox);
      }
      for (Msg& m : msgs) Handle(m);
      msgs.clear();
      std::vector<uint64_t> turn;
      turn.swap(later);
      for (uint64_t id : turn) {
        auto it = conns.find(id);
        if (it == conns.end()) continue;
        it->second.later = false;
        Advance(id);
      }
      if (!batch.empty()) {
        bool wake;
        {
          std::lock_guard<std::mutex> l(intake_mu);
          wake = intake_queue.empty();
          for (auto& p : batch) intake_queue.push_back(std::move(p));
        }
        batch.clear();
        if (wake) intake_cv.notify_one();
      }
      if (shutting_down) {
        if (conns.empty() || NowUs() > shutdown_deadline_us) {
          for (auto& [id, c] : conns)
            if (!c.slow) close(c.fd);  // (a request's own thread still owns its descriptor)
          conns.clear();
          return;
        }
        continue;
      }
      if (NowUs() >= next_sweep_us) Sweep();
    }
  }

  void Handle(Msg& m) {
    if (m.kind == Msg::kStop) {
      shutting_down = true;
      shutdown_deadline_us = NowUs() + 5000000;
      std::vector<uint64_t> ids;
      for (auto& [id, c] : conns) {
        shutdown(c.fd, SHUT_RDWR);  // a request's own thread sees it at its next write
        ids.push_back(id);
      }
      for (uint64_t id : ids)
        if (!conns[id].slow) Close(id);
      return;
    }
    if (m.kind == Msg::kConn) {
      Accept(m.fd);
      return;
    }
    auto it = conns.find(m.conn);
    if (it == conns.end()) return;  // closed meanwhile: its answer has nowhere to go
    Conn& c = it->second;
    if (!c.busy || c.req != m.req) return;  // answered already (a timeout, a stop)
    switch (m.kind) {
      case Msg::kAnswer:
        Done(c, std::move(m.text));
        break;
      case Msg::kWatch:
        c.wait_id = std::move(m.id);
        c.watch = std::move(m.watch);
        if (c.ended_unread)
          ReadEnd(m.conn, c, 0);
        else if (c.deadline_us > 0 && NowUs() >= c.deadline_us &&
                 s->h_->Unwatch(c.wait_id, c.watch))
          ReadEnd(m.conn, c, 0);  // its wait ran out while it was being stored
        break;
      case Msg::kEnded:
        if (m.task)
          Done(c, wire::Line(wire::Ok(wire::ToJson(*m.task))) + "\n");
        else if (c.wait_id.empty())
          c.ended_unread = true;
        else
          ReadEnd(m.conn, c, 0);
        break;
      case Msg::kSlowDone:
        c.slow = false;
        c.busy = false;
        c.last_done_us = NowUs();
        if (!m.alive) c.broken = c.closing = true;
        if (c.stalled) Read(c);
        break;
      default:
        break;
    }
    Advance(m.conn);
  }

  void Accept(int fd) {
    if (shutting_down) {
      close(fd);
      return;
    }
    if (conns.size() >= static_cast<size_t>(s->limits_.max_connections) && !EvictIdle()) {
      SendAll(fd,
              wire::Line(wire::Error(Status::ResourceExhausted(
                  "too many connections (" + std::to_string(s->limits_.max_connections) +
                  ", daemon.max_connections); try again shortly"))) +
                  "\n",
              1.0);
      close(fd);
      return;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    const uint64_t id = next_id++;
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP | EPOLLET;
    ev.data.u64 = id;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
      LogWarn("cannot watch a new connection: {}", strerror(errno));
      close(fd);
      return;
    }
    Conn& c = conns[id];
    c.id = id;
    c.fd = fd;
    c.user = PeerUser(fd);
    c.last_done_us = c.last_write_us = NowUs();
    NoteIdleDeadline(c);
  }

  // Evicts the connection silent longest (at least kEvictAfterSeconds, and not being
  // served) to make room for a new one; false if there is none.
  bool EvictIdle() {
    const int64_t now = NowUs(), min_idle = static_cast<int64_t>(kEvictAfterSeconds * 1e6);
    auto oldest = conns.end();
    for (auto it = conns.begin(); it != conns.end(); ++it) {
      const Conn& c = it->second;
      if (c.busy || c.closing || now - c.last_done_us < min_idle) continue;
      if (oldest == conns.end() || c.last_done_us < oldest->second.last_done_us) oldest = it;
    }
    if (oldest == conns.end()) return false;
    LogInfo("connection limit ({}) reached: closing a connection silent for {:.1f}s",
            s->limits_.max_connections, (now - oldest->second.last_done_us) / 1e6);
    Close(oldest->first);
    return true;
  }

  // Reads what the peer sent (edge-triggered: until EAGAIN, or a short read when the
  // peer has not hung up: more data makes a new edge, but a hang-up that came with this
  // data does not).
  void Read(Conn& c, bool hung_up = true) {
    c.stalled = false;
    Compact(c);
    char chunk[65536];
    while (!c.eof) {
      // No more than one request past the limit is held: a peer that sends ahead of its
      // answers waits in its socket until this one is answered, and an oversized line is
      // refused (Advance) before more of it is read.
      if (c.in.size() > s->limits_.max_request_bytes) {
        c.stalled = true;
        return;
      }
      ssize_t n = recv(c.fd, chunk, sizeof chunk, MSG_DONTWAIT);
      if (n > 0) {
        if (c.discarding && c.in.empty() && !std::memchr(chunk, '\n', static_cast<size_t>(n)))
          continue;  // all of it is the oversized line's
        c.in.append(chunk, static_cast<size_t>(n));
        if (!hung_up && static_cast<size_t>(n) < sizeof chunk) return;  // drained
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
      c.eof = true;
      if (n < 0) c.broken = true;  // reset: nothing more to serve or answer
    }
  }

  // Serves the next requests of a connection that is free to, and closes one that is done.
  // A peer may flood lines that are served at once (blank ones, or each refused): it
  // gets this many per turn, then waits behind the others (`later`).
  static constexpr int kLinesPerTurn = 16;

  void Advance(uint64_t id) {
    auto it = conns.find(id);
    if (it == conns.end()) return;
    Conn& c = it->second;
    const size_t max = s->limits_.max_request_bytes;
    int turn = kLinesPerTurn;
    while (!c.busy && c.out.empty() && !c.closing && !c.broken) {
      if (turn-- == 0) {
        if (!c.later) later.push_back(id);
        c.later = true;
        break;
      }
      size_t pos = c.in.find('\n', c.scanned);
      if (pos == std::string::npos) {
        Compact(c);
        c.scanned = c.in.size();
        if (c.discarding) {
          c.in.clear();
          c.scanned = 0;
        } else if (c.in.size() > max) {
          c.in.clear();
          c.scanned = 0;
          c.discarding = true;
          Answer(c, wire::Line(wire::Error(s->TooLarge())) + "\n");
          continue;
        }
        if (c.stalled) {
          Read(c);
          if (c.in.size() > c.scanned) continue;
        }
        if (c.eof) {
          if (!c.in.empty() && !c.discarding) {
            // A last request without its newline before the peer closed its side.
            c.in.push_back('\n');
            continue;
          }
          c.closing = true;
        }
        break;
      }
      // Served lines are cut off the buffer's front in one go (Compact), not one by one.
      std::string line = c.in.substr(c.head, pos - c.head);
      c.head = c.scanned = pos + 1;
      if (c.discarding) {
        c.discarding = false;
        continue;
      }
      if (line.size() > max) {
        Answer(c, wire::Line(wire::Error(s->TooLarge())) + "\n");
        continue;
      }
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.find_first_not_of(" \t") == std::string::npos) continue;
      Begin(id, c, line);
    }
    if (c.broken) c.closing = true;
    if (c.closing && !c.busy && (c.out.empty() || c.broken)) Close(id);
  }

  void Compact(Conn& c) {
    if (c.head == 0) return;
    c.in.erase(0, c.head);
    c.scanned -= std::min(c.scanned, c.head);
    c.head = 0;
  }

  // Starts one request: a submit joins the intake's next batch; anything else runs on a
  // thread of its own (it may read the store, wait or stream).
  void Begin(uint64_t id, Conn& c, const std::string& line) {
    c.busy = true;
    ++c.req;
    c.last_done_us = NowUs();
    c.deadline_us = 0;
    c.wait_id.clear();
    c.watch.reset();
    c.ended_unread = false;
    json req;
    json error = s->Parse(line, &req);
    if (!error.is_null()) {
      Done(c, wire::Line(error) + "\n");
      return;
    }
    if (req["op"] == "submit") {
      Pending p{id, c.req, {}};
      double timeout = 300;
      const Request r(req, "submit");  // checked as Dispatch checks it
      Status st = r.Allow(FindWireOp("submit")->fields);
      if (st.ok()) st = SubmitArgs(r, s->h_->limits(), &p.sub, &timeout);
      if (!st.ok()) {
        Done(c, wire::Line(wire::Error(st)) + "\n");
        return;
      }
      // The wait counts from now: the time to store and run the task is part of it.
      if (p.sub.wait_s >= 0) {
        c.deadline_us = c.last_done_us + static_cast<int64_t>(timeout * 1e6);
        next_sweep_us = std::min(next_sweep_us, c.deadline_us);
      }
      batch.push_back(std::move(p));
      return;
    }
    // Moved, never copied: copying a deeply nested request recurses once per level.
    auto shared = std::make_shared<const json>(std::move(req));
    OnThread(id, c,
             [this, shared, user = c.user](const std::function<bool(const std::string&)>& w) {
               return s->Guarded(*shared, w, user);
             });
  }

  // A request on a thread of its own: it writes its lines and answer itself (blocking,
  // a write that makes no progress for daemon.idle_timeout fails), then says so.
  void OnThread(uint64_t id, Conn& c,
                std::function<json(const std::function<bool(const std::string&)>&)> work) {
    c.slow = true;
    const int fd = c.fd;
    const uint64_t req = c.req;
    const double write_timeout = s->limits_.idle_timeout_s;
    try {
      std::thread([this, id, fd, req, write_timeout, work = std::move(work)] {
        pthread_setname_np(pthread_self(), "request");
        auto write_line = [&](const std::string& l) {
          return SendAll(fd, l + "\n", write_timeout);
        };
        Msg m{Msg::kSlowDone};
        m.conn = id;
        m.req = req;
        m.alive = write_line(wire::Line(work(write_line)));
        Post(std::move(m));
      }).detach();
    } catch (const std::system_error& e) {
      c.slow = false;
      Done(c, wire::Line(wire::Error(Status::Internal(
                  std::string("cannot start a thread for the request: ") + e.what()))) +
                  "\n");
    }
  }

  // The task of a waiting submit ended without its record, timed out, or cortexd is
  // stopping: its answer is read as `wait` reads it, on a thread of its own.
  void ReadEnd(uint64_t id, Conn& c, double timeout_s) {
    c.deadline_us = 0;
    c.watch.reset();
    OnThread(id, c,
             [this, task = c.wait_id, timeout_s](const std::function<bool(const std::string&)>&) {
               Task t;
               bool done = false;
               Status st = s->h_->WaitDone(task, timeout_s, &t, &done);
               if (!st.ok()) return wire::Error(st);
               json out = wire::ToJson(t);
               if (!done) out["waited"] = "timeout";
               return wire::Ok(out);
             });
  }

  void Done(Conn& c, std::string answer) {
    c.busy = false;
    c.deadline_us = 0;
    c.watch.reset();
    c.last_done_us = NowUs();
    NoteIdleDeadline(c);
    Answer(c, std::move(answer));
    if (c.stalled) Read(c);
  }

  void Answer(Conn& c, std::string text) {
    if (c.broken) return;
    if (c.out.empty())
      c.out = std::move(text);
    else
      c.out += text;
    Flush(c);
  }

  void Flush(Conn& c) {
    while (!c.out.empty() && !c.broken && !c.slow) {
      ssize_t w = send(c.fd, c.out.data(), c.out.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      if (w > 0) {
        c.out.erase(0, static_cast<size_t>(w));
        c.last_write_us = NowUs();
        continue;
      }
      if (w < 0 && errno == EINTR) continue;
      if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        Arm(c, true);
        return;
      }
      c.broken = c.closing = true;
      c.out.clear();
    }
    if (c.out_armed) Arm(c, false);
  }

  void Arm(Conn& c, bool out) {
    if (c.out_armed == out) return;
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP | EPOLLET | (out ? EPOLLOUT : 0u);
    ev.data.u64 = c.id;
    epoll_ctl(ep, EPOLL_CTL_MOD, c.fd, &ev);
    c.out_armed = out;
    if (out) NoteIdleDeadline(c);
  }

  void Close(uint64_t id) {
    auto it = conns.find(id);
    if (it == conns.end()) return;
    epoll_ctl(ep, EPOLL_CTL_DEL, it->second.fd, nullptr);
    close(it->second.fd);
    conns.erase(it);
  }

  void NoteIdleDeadline(const Conn& c) {
    if (s->limits_.idle_timeout_s <= 0) return;
    const int64_t idle_us = static_cast<int64_t>(std::min(s->limits_.idle_timeout_s, 1e6) * 1e6);
    next_sweep_us = std::min(next_sweep_us, std::max(c.last_done_us, c.last_write_us) + idle_us);
  }

  // Timers: waits that reach their deadline or a stop, connections idle too long (no
  // complete request since the last answer, or an answer the peer does not read).
  void Sweep() {
    const int64_t now = NowUs();
    const bool stopping = s->h_->Stopping();
    const double idle_s = std::min(s->limits_.idle_timeout_s, 1e6);
    const int64_t idle_us = static_cast<int64_t>(idle_s * 1e6);
    next_sweep_us = now + 1000000;
    std::vector<uint64_t> ids;
    for (auto& [id, c] : conns) ids.push_back(id);
    for (uint64_t id : ids) {
      auto it = conns.find(id);
      if (it == conns.end()) continue;
      Conn& c = it->second;
      if (c.busy && !c.slow && c.deadline_us > 0) {
        if (!c.wait_id.empty() && (now >= c.deadline_us || stopping)) {
          // Taken back in time: its answer is read now (else it is on its way here).
          if (s->h_->Unwatch(c.wait_id, c.watch)) ReadEnd(id, c, 0);
        } else {
          // A stop ends waits within 200 ms, as in `wait` (and an id still on its way
          // from the intake is looked for again then).
          next_sweep_us = std::min(
              {next_sweep_us, now + 200000, c.deadline_us > now ? c.deadline_us : now + 200000});
        }
        continue;
      }
      if (c.busy || idle_us <= 0) continue;
      if (!c.out.empty()) {
        if (now - c.last_write_us >= idle_us) {
          c.broken = c.closing = true;  // it does not read its answers
          Advance(id);
        } else {
          next_sweep_us = std::min(next_sweep_us, c.last_write_us + idle_us);
        }
        continue;
      }
      if (now - c.last_done_us >= idle_us) {
        // No complete request for too long: its slot is worth more to others.
        Answer(c, wire::Line(wire::Error(Status::Timeout(
                      fmt::format("closing the connection: no complete request within {:g}s "
                                  "(daemon.idle_timeout)",
                                  s->limits_.idle_timeout_s)))) +
                      "\n");
        c.closing = true;
        c.broken = true;  // whatever it sent since is not served
        Advance(id);
      } else {
        next_sweep_us = std::min(next_sweep_us, c.last_done_us + idle_us);
      }
    }
  }

  Server* const s;
  int ep = -1, efd = -1;
  std::thread io, intake;

  std::mutex mu;  // guards inbox
  std::vector<Msg> inbox;

  std::mutex intake_mu;  // guards the two below
  std::condition_variable intake_cv;
  std::vector<Pending> intake_queue;
  bool intake_stop = false;

  // The connections' thread only:
  std::unordered_map<uint64_t, Conn> conns;
  uint64_t next_id = 1;
  std::vector<Pending> batch;   // submits read in this wake-up
  std::vector<uint64_t> later;  // connections with lines left when their turn ended
  int64_t next_sweep_us = 0;
  bool shutting_down = false;
  int64_t shutdown_deadline_us = 0;
};

void Server::AcceptOne() {
  int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
  if (fd < 0) {
    // Out of descriptors or memory: the connection stays in the backlog and poll reports
    // it again at once; a pause keeps the main loop from spinning on it meanwhile.
    if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
      if (!accept_failing_)
        LogWarn("cannot accept connections ({}); waiting for descriptors to come free",
                strerror(errno));
      accept_failing_ = true;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return;
  }
  if (accept_failing_) {
    LogInfo("accepting connections again");
    accept_failing_ = false;
  }
  // The socket's 0600/0700 permissions are the first gate; this is the second, for a
  // socket whose folder was loosened or that was handed to someone else.
  if (Status peer = CheckPeer(fd); !peer.ok()) {
    LogWarn("refused a connection: {}", peer.message());
    SendAll(fd, wire::Line(wire::Error(peer)) + "\n", 1.0);
    close(fd);
    return;
  }
  if (!loop_) {
    close(fd);
    return;
  }
  Loop::Msg m{Loop::Msg::kConn};
  m.fd = fd;
  loop_->Post(std::move(m));
}

void Server::StopAccepting() {
  if (listen_fd_ >= 0) {
    close(listen_fd_);
    listen_fd_ = -1;
    unlink(path_.c_str());
  }
}

void Server::CloseConnections() {
  if (loop_) loop_->Stop();
}

Server::Server(RequestHandler* handler, ServerLimits limits) : h_(handler), limits_(limits) {}

Server::~Server() {
  StopAccepting();
  CloseConnections();
}

namespace {

// daemon.allow_group: the socket folder and the socket are handed to that group (0750 and
// 0660), so its members reach the peer-credential check at all; nobody else gets in. The
// folder was just made or checked private, so this only widens it to one group.
Status OpenToGroup(const std::string& dir, const std::string& socket, const std::string& group) {
  struct group* g = getgrnam(group.c_str());
  if (!g) return Status::InvalidArgument("daemon.allow_group: no group named '" + group + "'");
  const gid_t gid = g->gr_gid;
  auto failed = [&](const std::string& path) {
    return Status::PermissionDenied(fmt::format(
        "daemon.allow_group: cannot give {} to group '{}': {}{}", path, group, strerror(errno),
        errno == EPERM ? " (cortexd's user must be a member of that group)" : ""));
  };
  // The folder through a descriptor (a symlink swapped in is refused, never followed); the
  // socket by path, inside that folder, which only we can change.
  int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return failed(dir);
  const bool ok = fchown(fd, static_cast<uid_t>(-1), gid) == 0 && fchmod(fd, 0750) == 0;
  Status st = ok ? Status::OK() : failed(dir);
  close(fd);
  CORTEX_RETURN_IF_ERROR(st);
  if (chown(socket.c_str(), static_cast<uid_t>(-1), gid) != 0 || chmod(socket.c_str(), 0660) != 0)
    return failed(socket);
  return Status::OK();
}

}  // namespace

Status Server::Listen(const std::string& path) {
  sockaddr_un addr{};
  if (path.size() >= sizeof(addr.sun_path))
    return Status::InvalidArgument("socket path is too long (" + std::to_string(path.size()) +
                                   " bytes, at most " + std::to_string(sizeof(addr.sun_path) - 1) +
                                   "): " + path);
  std::string dir = fs::path(path).parent_path().string();
  if (dir.empty()) dir = ".";
  CORTEX_RETURN_IF_ERROR(Env::Default()->MakePrivateDir(dir, true).WithContext("daemon.socket"));

  // A live daemon answers on the socket; a stale file from a crash is removed.
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  addr.sun_family = AF_UNIX;
  int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (probe >= 0) {
    bool live = connect(probe, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
    close(probe);
    if (live) return Status::AlreadyExists("another cortexd is already listening on " + path);
  }
  unlink(path.c_str());

  listen_fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listen_fd_ < 0) return Status::IOError(std::string("socket: ") + strerror(errno));
  mode_t old = umask(077);
  int rc = bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  umask(old);
  if (rc != 0) return Status::IOError("cannot bind " + path + ": " + strerror(errno));
  chmod(path.c_str(), 0600);
  if (!limits_.allow_group.empty())
    CORTEX_RETURN_IF_ERROR(OpenToGroup(dir, path, limits_.allow_group));
  if (listen(listen_fd_, 128) != 0)
    return Status::IOError(std::string("listen: ") + strerror(errno));
  fcntl(listen_fd_, F_SETFL, O_NONBLOCK);
  path_ = path;
  auto loop = std::make_unique<Loop>(this);
  CORTEX_RETURN_IF_ERROR(loop->Start());
  loop_ = std::move(loop);
  return Status::OK();
}

json Server::HandleLine(const std::string& line,
                        const std::function<bool(const std::string&)>& write_line) {
  json req;
  json error = Parse(line, &req);
  return error.is_null() ? Guarded(req, write_line) : error;
}

json Server::Parse(const std::string& line, json* out) const {
  if (size_t bad = wire::InvalidUtf8At(line); bad != std::string::npos)
    return wire::Error(Bad(
        fmt::format("request is not valid UTF-8 (byte 0x{:02x} at offset {}); text must be UTF-8",
                    static_cast<unsigned char>(line[bad]), bad)));
  json req;
  // Keys seen per open object: a repeated key is refused, not silently overwritten.
  std::vector<std::set<std::string>> keys;
  std::string duplicate;
  auto check_keys = [&](int, json::parse_event_t ev, json& parsed) {
    if (ev == json::parse_event_t::object_start) {
      keys.emplace_back();
    } else if (ev == json::parse_event_t::object_end) {
      if (!keys.empty()) keys.pop_back();
    } else if (ev == json::parse_event_t::key && !keys.empty() && duplicate.empty() &&
               !keys.back().insert(parsed.get<std::string>()).second) {
      duplicate = parsed.get<std::string>();
    }
    return true;
  };
  try {
    req = json::parse(line, check_keys);
  } catch (const json::parse_error& e) {
    std::string what = e.what();  // "[json.exception.parse_error.101] parse error at ...: why"
    size_t colon = what.find(": ");
    return wire::Error(
        Bad(fmt::format("malformed JSON at byte {}: {}", e.byte,
                        colon == std::string::npos ? what : what.substr(colon + 2))));
  } catch (const json::exception& e) {  // e.g. out_of_range: a number too large ("1e999")
    std::string what = e.what();
    size_t close = what.find("] ");
    return wire::Error(
        Bad("malformed JSON: " + (close == std::string::npos ? what : what.substr(close + 2))));
  }
  if (!duplicate.empty())
    return wire::Error(Bad("duplicate key '" + Printable(duplicate.substr(0, 64)) +
                           "' in the request: each field may appear once"));
  if (!req.is_object()) return wire::Error(Bad("a request must be a JSON object with an \"op\""));
  if (!req.contains("op"))
    return wire::Error(Bad("missing field 'op' (a string: one of " + WireOpNames() + ")"));
  if (!req["op"].is_string())
    return wire::Error(Bad("'op' must be a string: one of " + WireOpNames()));
  *out = std::move(req);
  return nullptr;
}

json Server::Guarded(const json& req, const std::function<bool(const std::string&)>& write_line,
                     const std::string& user) {
  try {
    return Dispatch(req, write_line, user);
  } catch (const std::exception& e) {
    LogError("request {} failed: {}", req["op"].get<std::string>(), e.what());
    return wire::Error(Status::Internal(e.what()));
  }
}

json Server::Dispatch(const json& j, const std::function<bool(const std::string&)>& write_line,
                      const std::string& user) {
  const std::string op = j["op"].get<std::string>();
  const WireOp* spec = FindWireOp(op);
  if (!spec)
    return wire::Error(
        Bad("unknown op '" + Printable(op) + "' (expected one of: " + WireOpNames() + ")"));
  Request r(j, op);
  const DaemonConfig& lim = h_->limits();
  auto fail = [](const Status& s) { return wire::Error(s); };
#define CHECK(expr)                \
  do {                             \
    Status _s = (expr);            \
    if (!_s.ok()) return fail(_s); \
  } while (0)
  CHECK(r.Allow(spec->fields));

  // A task id may be any unique prefix of at least 4 characters.
  auto task_id = [&](std::string* id) -> Status {
    CORTEX_RETURN_IF_ERROR(r.String("id", true, id));
    if (id->size() < 4)
      return Bad("task id '" + Printable(*id) + "' is too short: give at least 4 characters of it");
    if (id->size() > 64)  // (and not echoed: it is not an id)
      return Bad("a task id of " + std::to_string(id->size()) + " bytes: ids are 12 characters");
    const std::string given = *id;
    Status s = h_->store()->ResolveTaskId(given, id);
    if (s.ok()) return s;
    // Ids are lowercase hex; one copied in upper case (from a report, a ticket) still finds
    // its task. The exact spelling is tried first: an imported id may have capitals.
    std::string lower = given;
    for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (s.code() == Status::Code::kNotFound && lower != given &&
        h_->store()->ResolveTaskId(lower, id).ok())
      return Status::OK();
    *id = given;
    return s;
  };
  // The task once it has ended, or as it is when `timeout_s` runs out ("waited").
  auto ended = [&](const std::string& id, double timeout_s, json* out) -> Status {
    Task t;
    bool done = false;
    CORTEX_RETURN_IF_ERROR(h_->WaitDone(id, timeout_s, &t, &done));
    *out = wire::ToJson(t);
    if (!done) (*out)["waited"] = "timeout";
    return Status::OK();
  };
  switch (spec->id) {
    case Op::kWait:
    case Op::kCancel: {
      std::string id;
      CHECK(task_id(&id));
      double timeout = spec->id == Op::kWait ? 300 : 30;
      CHECK(r.Number("timeout_s", 0, 86400, &timeout));
      if (spec->id == Op::kCancel) CHECK(h_->Cancel(id));
      json out;
      CHECK(ended(id, timeout, &out));
      return wire::Ok(out);
    }

    case Op::kRoute: {
      std::string text;
      Tags tags;
      CHECK(TaskArgs(r, lim, &text, &tags));
      Decision d;
      CHECK(h_->Route(text, tags, &d));
      json out = wire::ToJson(d);
      out["text"] = text;
      // A forced expert that cannot take the task now: a submitted one would wait for it.
      if (d.forced) {
        std::shared_ptr<Expert> e = h_->registry()->Find(d.chosen);
        if (!e || e->quarantined()) out["waits_for"] = e ? "release" : "load";
      }
      return wire::Ok(out);
    }
    case Op::kSubmit: {
      Submission sub;
      double timeout = 300;
      CHECK(SubmitArgs(r, lim, &sub, &timeout));
      std::string id;
      // The wait counts from now: the time to store and run the task is part of it.
      const int64_t start = NowUs();
      CHECK(h_->Submit(sub.text, sub.tags, sub.wait_s, &id));
      if (sub.wait_s < 0) return wire::Ok({{"id", id}, {"state", "queued"}});
      json out;
      CHECK(ended(id, std::max(0.0, timeout - (NowUs() - start) / 1e6), &out));
      return wire::Ok(out);
    }
    case Op::kShow: {
      std::string id;
      CHECK(task_id(&id));
      Task t;
      CHECK(h_->store()->GetTask(id, &t));
      return wire::Ok(wire::ToJson(t));
    }
    case Op::kHistory: {
      HistoryQuery q;
      double limit = 20;
      CHECK(r.Number("limit", 1, 100000, &limit));
      q.limit = static_cast<int>(limit);
      CHECK(r.String("expert", false, &q.expert));
      CHECK(r.Number("since", 0, 1e11, &q.since));
      double after_seq = 0;
      CHECK(r.Number("after_seq", 0, 9e15, &after_seq));
      q.after_seq = static_cast<long>(after_seq);
      CHECK(r.String("outcome", false, &q.outcome));
      static const std::set<std::string> kKinds = {"success",  "failure",   "timeout",    "crash",
                                                   "rejected", "cancelled", "interrupted"};
      if (!q.outcome.empty() && !kKinds.count(q.outcome))
        return fail(
            Bad("field 'outcome' must be one of success, failure, timeout, crash, "
                "rejected, cancelled, interrupted"));
      std::vector<HistoryRow> rows;
      CHECK(h_->store()->History(q, &rows));
      json a = json::array();
      for (const auto& row : rows) a.push_back(wire::ToJson(row));
      return wire::Ok(a);
    }
    case Op::kExperts:
    case Op::kConfidence: {
      std::string only;
      CHECK(r.String("expert", false, &only));
      std::vector<ExpertStats> stats;
      CHECK(h_->store()->Stats(&stats));
      std::map<std::string, ExpertStats> by;
      for (const auto& s : stats) by[s.expert] = s;
      json a = json::array();
      if (spec->id == Op::kExperts) {
        for (const auto& e : h_->registry()->List()) {
          const ExpertStats& s = by[e.name];
          a.push_back({{"name", e.name},
                       {"node", h_->Node().empty() ? json(nullptr) : json(h_->Node())},
                       {"version", e.version},
                       {"state", e.state},
                       {"file", e.file},
                       {"plugin", e.plugin},
                       {"description", e.description},
                       {"keywords", e.keywords},
                       {"inflight", e.inflight},
                       {"capacity", e.capacity},
                       {"timeout_s", e.timeout_s},
                       {"isolation", e.isolation},
                       {"host_pid", e.host_pid ? json(e.host_pid) : json(nullptr)},
                       {"memory_limit", e.memory_limit ? json(e.memory_limit) : json(nullptr)},
                       {"health",
                        {{"crashes", e.health.crashes},
                         {"consecutive_crashes", e.health.consecutive_crashes},
                         {"restarts", e.health.restarts},
                         {"crash_rate", e.health.crash_rate},
                         {"last_crash",
                          e.health.last_crash.empty() ? json(nullptr) : json(e.health.last_crash)},
                         {"last_crash_at", e.health.last_crash_at
                                               ? json(wire::IsoTime(e.health.last_crash_at))
                                               : json(nullptr)},
                         {"quarantined_since", e.health.quarantined_at
                                                   ? json(wire::IsoTime(e.health.quarantined_at))
                                                   : json(nullptr)},
                         {"retry_in_s", e.health.retry_in_s}}},
                       {"routed", s.routed},
                       {"attempts", s.attempts},
                       {"success_rate",
                        s.attempts ? json(double(s.successes) / s.attempts) : json(nullptr)},
                       {"mean_quality", s.attempts ? json(s.mean_quality) : json(nullptr)}});
        }
        for (json& x : h_->RemoteExperts()) {  // a cluster: instances on other nodes
          const ExpertStats& s = by[x.value("name", "")];
          x["routed"] = s.routed;
          x["attempts"] = s.attempts;
          x["success_rate"] = s.attempts ? json(double(s.successes) / s.attempts) : json(nullptr);
          x["mean_quality"] = s.attempts ? json(s.mean_quality) : json(nullptr);
          a.push_back(std::move(x));
        }
        return wire::Ok(a);
      }
      std::set<std::string> names;
      for (const auto& e : h_->registry()->List()) names.insert(e.name);
      for (const auto& s : stats) names.insert(s.expert);
      if (!only.empty() && !names.count(only))
        return fail(Status::NotFound("no expert named '" + Printable(only) +
                                     "' is loaded or in the history"));
      for (const auto& n : names) {
        if (!only.empty() && n != only) continue;
        const ExpertStats& s = by[n];
        a.push_back(
            {{"expert", n},
             {"decisions", s.routed},
             {"calibrated", s.calibrated},
             {"mean_confidence", s.calibrated ? json(s.mean_confidence) : json(nullptr)},
             {"success_rate", s.calibrated ? json(s.first_success_rate) : json(nullptr)},
             {"gap", s.calibrated ? json(s.mean_confidence - s.first_success_rate) : json(nullptr)},
             {"brier", s.calibrated ? json(s.brier) : json(nullptr)}});
      }
      return wire::Ok(a);
    }
    case Op::kEvents: {
      double limit = 50;
      CHECK(r.Number("limit", 1, 10000, &limit));
      std::vector<ExpertEvent> ev;
      CHECK(h_->store()->ExpertEvents(static_cast<int>(limit), &ev));
      json a = json::array();
      for (const auto& e : ev) a.push_back(wire::ToJson(e));
      return wire::Ok(a);
    }
    case Op::kFeedback: {
      std::string id, note;
      CHECK(task_id(&id));
      if (!r.Has("quality")) return fail(Bad("missing field 'quality' (0..1) for op feedback"));
      double q = -1;
      CHECK(r.Number("quality", 0, 1, &q));
      CHECK(r.String("note", false, &note));
      if (note.size() > 4096) return fail(Bad("field 'note' is longer than 4096 bytes"));
      Task t;
      CHECK(h_->store()->GetTask(id, &t));
      if (!IsFinal(t.state))
        return fail(Status::FailedPrecondition("task " + id + " is " + ToString(t.state) +
                                               "; feedback applies to a finished task"));
      // The attempt judged is the last that finished: one cortexd interrupted did no work
      // to judge (the store refuses a task with none at all).
      for (auto a = t.attempts.rbegin(); a != t.attempts.rend(); ++a)
        if (a->outcome) {
          if (a->outcome->kind == OutcomeKind::kInterrupted)
            return fail(Status::FailedPrecondition(
                "task " + id + "'s last attempt was interrupted: there is nothing to judge"));
          break;
        }
      json result;
      CHECK(h_->Feedback(id, {Env::Default()->NowUnix(), q, note, user}, &result));
      return wire::Ok(result);
    }
    case Op::kReload: {
      json summary;
      CHECK(h_->Reload(&summary));
      return wire::Ok(summary);
    }
    case Op::kRetrain: {
      bool wait = false;
      if (r.Has("wait")) {
        if (!j["wait"].is_boolean()) return fail(Bad("field 'wait' must be true or false"));
        wait = j["wait"].get<bool>();
      }
      json result;
      CHECK(h_->Retrain(
          wait,
          [&](const std::string& msg) {
            return write_line(wire::Line(json{{"row", {{"progress", msg}}}}));
          },
          &result));
      return wire::Ok(result);
    }
    case Op::kModels: {
      json result;
      CHECK(h_->Models(&result));
      return wire::Ok(result);
    }
    case Op::kExplain: {
      std::string id;
      CHECK(task_id(&id));
      Task t;
      CHECK(h_->store()->GetTask(id, &t));
      json result;
      CHECK(h_->Explain(t, &result));
      return wire::Ok(result);
    }
    case Op::kRelease: {
      std::string name;
      CHECK(r.String("expert", true, &name));
      CHECK(h_->registry()->Release(name));
      return wire::Ok({{"expert", name}, {"state", "active"}});
    }
    case Op::kRollback: {
      if (!r.Has("version")) return fail(Bad("missing field 'version' for op rollback"));
      bool force = false;
      CHECK(r.Bool("force", &force));
      double v = 0;
      CHECK(r.Number("version", 0, 1e9, &v));
      if (v != static_cast<int>(v)) return fail(Bad("field 'version' must be a whole number"));
      json result;
      CHECK(h_->Rollback(static_cast<int>(v), force, &result));
      return wire::Ok(result);
    }
    case Op::kStatus: {
      return wire::Ok(h_->Status_());
    }
    case Op::kReport: {
      ReportQuery q;
      double buckets = q.buckets;
      CHECK(r.Number("since", 0, 1e11, &q.since));
      CHECK(r.Number("until", 0, 1e11, &q.until));
      CHECK(r.Number("buckets", 1, 1000, &buckets));
      if (buckets != static_cast<int>(buckets))
        return fail(Bad("field 'buckets' must be a whole number (at most that many buckets)"));
      if (q.until > 0 && q.until < q.since) return fail(Bad("field 'until' is before 'since'"));
      q.buckets = static_cast<int>(buckets);
      ReportData data;
      CHECK(h_->store()->Report(q, &data));
      return wire::Ok(wire::ToJson(data));
    }
    case Op::kExport: {
      double since = 0;
      CHECK(r.Number("since", 0, 1e11, &since));
      long count = 0;
      bool alive = true;
      CHECK(h_->store()->ForEachTask(since, [&](const Task& t) {
        alive = write_line(wire::Line(json{{"row", wire::ExportRow(t)}}));
        ++count;
        return alive;
      }));
      return wire::Ok({{"count", count}});
    }
  }  // every Op has its case: -Wswitch names one that has none
#undef CHECK
  return wire::Error(Status::Internal("op '" + op + "' has no handler"));
}

}  // namespace cortex
