#include "server.h"

#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <pwd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <set>
#include <thread>
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

bool WriteAll(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    ssize_t w = send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    off += static_cast<size_t>(w);
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

}  // namespace

Server::~Server() {
  StopAccepting();
  CloseConnections();
}

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
  if (listen(listen_fd_, 128) != 0)
    return Status::IOError(std::string("listen: ") + strerror(errno));
  fcntl(listen_fd_, F_SETFL, O_NONBLOCK);
  path_ = path;
  return Status::OK();
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
    WriteAll(fd, wire::Line(wire::Error(peer)) + "\n");
    close(fd);
    return;
  }
  std::unique_lock<std::mutex> l(mu_);
  if (active_ >= limits_.max_connections && !EvictIdleLocked()) {
    l.unlock();
    WriteAll(fd,
             wire::Error(Status::ResourceExhausted("too many connections (" +
                                                   std::to_string(limits_.max_connections) +
                                                   ", daemon.max_connections); try again shortly"))
                     .dump() +
                 "\n");
    close(fd);
    return;
  }
  ++active_;
  conns_[fd] = Conn{NowUs(), false, false};
  l.unlock();
  try {
    std::thread([this, fd] {
      pthread_setname_np(pthread_self(), "connection");
      Serve(fd);
    }).detach();
  } catch (const std::system_error&) {
    std::lock_guard<std::mutex> g(mu_);
    conns_.erase(fd);
    --active_;
    close(fd);
  }
}

void Server::StopAccepting() {
  if (listen_fd_ >= 0) {
    close(listen_fd_);
    listen_fd_ = -1;
    unlink(path_.c_str());
  }
}

void Server::CloseConnections() {
  std::unique_lock<std::mutex> l(mu_);
  for (const auto& [fd, c] : conns_) shutdown(fd, SHUT_RDWR);
  cv_.wait_for(l, std::chrono::seconds(5), [&] { return active_ == 0; });
}

Status Server::TooLarge() const {
  return Status::ResourceExhausted("request is larger than " +
                                   std::to_string(limits_.max_request_bytes) +
                                   " bytes (daemon.max_request_bytes)");
}

bool Server::EvictIdleLocked() {
  const int64_t now = NowUs(), min_idle = static_cast<int64_t>(kEvictAfterSeconds * 1e6);
  auto oldest = conns_.end();
  for (auto it = conns_.begin(); it != conns_.end(); ++it) {
    const Conn& c = it->second;
    if (c.busy || c.evicted || now - c.last_active_us < min_idle) continue;
    if (oldest == conns_.end() || c.last_active_us < oldest->second.last_active_us) oldest = it;
  }
  if (oldest == conns_.end()) return false;
  // Its thread sees the end and leaves; the new connection is served meanwhile.
  oldest->second.evicted = true;
  LogInfo("connection limit ({}) reached: closing a connection silent for {:.1f}s",
          limits_.max_connections, (now - oldest->second.last_active_us) / 1e6);
  shutdown(oldest->first, SHUT_RDWR);
  return true;
}

void Server::Serve(int fd) {
  // A client that sends requests but never reads the answers would hold this thread in a
  // blocked write, and its slot, forever: a write that makes no progress for
  // daemon.idle_timeout fails, and the connection is closed.
  if (limits_.idle_timeout_s > 0) {
    const double t = std::min(limits_.idle_timeout_s, 1e6);
    struct timeval tv = {
        static_cast<time_t>(t),
        static_cast<suseconds_t>((t - static_cast<double>(static_cast<time_t>(t))) * 1e6)};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  }
  std::string buf;
  bool discarding = false;  // inside an oversized line: skip to its end
  char chunk[65536];
  auto write_line = [fd](const std::string& s) { return WriteAll(fd, s + "\n"); };
  // The idle clock runs from the last answered request (or the connection's start), not
  // from the last byte: a client trickling a request that never ends is idle all along.
  int64_t last_done_us = NowUs();
  auto mark = [&](bool busy) {
    last_done_us = NowUs();
    std::lock_guard<std::mutex> l(mu_);
    Conn& c = conns_[fd];
    c.busy = busy;
    c.last_active_us = last_done_us;
  };
  // Answers one complete request line; false once the peer is gone.
  auto serve_line = [&](std::string line) {
    if (line.size() > limits_.max_request_bytes)
      return write_line(wire::Line(wire::Error(TooLarge())));
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) return true;
    mark(true);
    bool alive = write_line(wire::Line(HandleLine(line, write_line)));
    mark(false);
    return alive;
  };
  const int64_t idle_us = static_cast<int64_t>(std::min(limits_.idle_timeout_s, 1e6) * 1e6);
  // The idle deadline is the receive timeout: between requests the full idle time (set
  // once, so a steady client costs one call per request), within a partial request what
  // is left of it.
  int64_t timeout_set_us = 0;  // 0: none
  auto receive_within = [&](int64_t us) {
    if (us == timeout_set_us) return;
    struct timeval tv = {static_cast<time_t>(us / 1000000), static_cast<suseconds_t>(us % 1000000)};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    timeout_set_us = us;
  };
  for (;;) {
    if (idle_us > 0) {
      const int64_t left_us = last_done_us + idle_us - NowUs();
      if (left_us <= 0) {  // no complete request for too long: its slot is worth more to others
        write_line(wire::Line(wire::Error(Status::Timeout(fmt::format(
            "closing the connection: no complete request within {:g}s (daemon.idle_timeout)",
            limits_.idle_timeout_s)))));
        break;
      }
      // (Within a millisecond of the full time, as right after an answer: the full time,
      // so the timeout already set serves; a blank line since does not reset the clock.)
      receive_within(buf.empty() && !discarding && left_us > idle_us - 1000 ? idle_us : left_us);
    }
    ssize_t n = recv(fd, chunk, sizeof chunk, 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
    if (n == 0 && !discarding && !buf.empty()) {
      // A last request without its newline before the peer closed its side: answer it.
      serve_line(std::exchange(buf, std::string()));
      break;
    }
    if (n <= 0) break;
    buf.append(chunk, static_cast<size_t>(n));
    size_t pos;
    bool alive = true;
    while (alive && (pos = buf.find('\n')) != std::string::npos) {
      std::string line = buf.substr(0, pos);
      buf.erase(0, pos + 1);
      if (discarding) {
        discarding = false;
        continue;
      }
      alive = serve_line(std::move(line));
    }
    if (!alive) break;
    if (!discarding && buf.size() > limits_.max_request_bytes) {
      write_line(wire::Line(wire::Error(TooLarge())));
      buf.clear();
      discarding = true;
    } else if (discarding) {
      buf.clear();
    }
  }
  close(fd);
  std::lock_guard<std::mutex> l(mu_);
  conns_.erase(fd);
  --active_;
  cv_.notify_all();
}

json Server::HandleLine(const std::string& line,
                        const std::function<bool(const std::string&)>& write_line) {
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
  try {
    return Dispatch(req, write_line);
  } catch (const std::exception& e) {
    LogError("request {} failed: {}", req["op"].get<std::string>(), e.what());
    return wire::Error(Status::Internal(e.what()));
  }
}

json Server::Dispatch(const json& j, const std::function<bool(const std::string&)>& write_line) {
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
    return h_->store()->ResolveTaskId(*id, id);
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

    case Op::kSubmit:
    case Op::kRoute: {
      std::string text;
      Tags tags;
      CHECK(r.String("text", true, &text));
      CHECK(CheckText(text, lim));
      CHECK(ParseTags(r, lim, &tags));
      if (spec->id == Op::kRoute) {
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
      bool wait = false;
      double timeout = 300;
      CHECK(r.Bool("wait", &wait));
      CHECK(r.Number("timeout_s", 0, 86400, &timeout));
      std::string id;
      // The wait counts from now: a first attempt run inside Submit spends part of it.
      const int64_t start = NowUs();
      CHECK(h_->Submit(text, tags, wait ? timeout : -1, &id));
      if (!wait) return wire::Ok({{"id", id}, {"state", "queued"}});
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
      CHECK(h_->store()->AddFeedback(id, {Env::Default()->NowUnix(), q, note}));
      return wire::Ok({{"id", id}, {"quality", q}});
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
