#include "host_protocol.h"

#include <errno.h>
#include <sys/socket.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace cortex::hostproto {

using json = nlohmann::json;

namespace {

Status Bad(const std::string& what) { return Status::Corruption("plugin host protocol: " + what); }

Status Str(const json& j, const char* key, size_t max, std::string* out, bool required = true) {
  auto it = j.find(key);
  if (it == j.end()) return required ? Bad(std::string("missing '") + key + "'") : Status::OK();
  if (!it->is_string()) return Bad(std::string("'") + key + "' is not a string");
  *out = it->get<std::string>();
  if (out->size() > max) out->resize(max);
  return Status::OK();
}

Status StrList(const json& j, const char* key, std::vector<std::string>* out) {
  auto it = j.find(key);
  if (it == j.end()) return Status::OK();
  if (!it->is_array() || it->size() > 256) return Bad(std::string("'") + key + "' is not a list");
  for (const auto& s : *it) {
    if (!s.is_string()) return Bad(std::string("'") + key + "' holds a non-string");
    out->push_back(s.get<std::string>().substr(0, 4096));
  }
  return Status::OK();
}

}  // namespace

namespace {

Status Encode(const json& frame, std::string* out) {
  std::string body = frame.dump(-1, ' ', false, json::error_handler_t::replace);
  if (body.size() > kMaxFrame) return Status::ResourceExhausted("frame too large");
  const uint32_t n = static_cast<uint32_t>(body.size());
  for (int i = 0; i < 4; ++i) out->push_back(static_cast<char>((n >> (8 * i)) & 0xFF));
  *out += body;
  return Status::OK();
}

Status WriteAll(int fd, const std::string& buf) {
  size_t off = 0;
  while (off < buf.size()) {
    ssize_t w = ::send(fd, buf.data() + off, buf.size() - off, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0)
      return Status::IOError(std::string("plugin host socket: ") +
                             (w < 0 ? strerror(errno) : "closed"));
    off += static_cast<size_t>(w);
  }
  return Status::OK();
}

}  // namespace

namespace {
thread_local FrameWriter::Batch* t_batch = nullptr;
}  // namespace

FrameWriter::Batch::Batch() : outer_(t_batch) { t_batch = this; }

FrameWriter::Batch::~Batch() {
  t_batch = outer_;
  for (auto& [writer, bytes] : held_) (void)writer->Write(std::move(bytes));
}

Status FrameWriter::Send(const json& frame, bool may_hold) {
  std::string mine;
  CORTEX_RETURN_IF_ERROR(Encode(frame, &mine));  // outside the lock
  if (may_hold && t_batch) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (!failed_.ok()) return failed_;
    }
    auto& held = t_batch->held_;
    auto it =
        std::find_if(held.begin(), held.end(), [&](const auto& h) { return h.first == this; });
    if (it == held.end()) it = held.insert(held.end(), {this, std::string()});
    it->second += mine;
    return Status::OK();
  }
  return Write(std::move(mine));
}

Status FrameWriter::Write(std::string bytes) {
  std::unique_lock<std::mutex> l(mu_);
  if (!failed_.ok()) return failed_;
  out_ += bytes;
  if (writing_) return Status::OK();  // the writer at work takes it along
  writing_ = true;
  bool first_failure = false;
  while (!out_.empty() && failed_.ok()) {
    std::string buf;
    buf.swap(out_);
    l.unlock();
    Status st = WriteAll(fd_, buf);
    l.lock();
    if (!st.ok()) failed_ = st, first_failure = true;
  }
  writing_ = false;
  Status result = failed_;
  l.unlock();
  if (first_failure && on_fail_) on_fail_(result);
  return result;
}

Status FrameReader::Feed(const char* data, size_t n, std::vector<json>* frames) {
  buf_.append(data, n);
  size_t off = 0;
  Status st;
  while (buf_.size() - off >= 4) {
    uint32_t len = 0;
    for (int i = 0; i < 4; ++i)
      len |= static_cast<uint32_t>(static_cast<uint8_t>(buf_[off + i])) << (8 * i);
    if (len > kMaxFrame) {
      st = Bad("a frame of " + std::to_string(len) + " bytes (the limit is " +
               std::to_string(kMaxFrame) + ")");
      break;
    }
    if (buf_.size() - off - 4 < len) break;
    json j = json::parse(buf_.begin() + static_cast<long>(off) + 4,
                         buf_.begin() + static_cast<long>(off + 4 + len), nullptr, false);
    off += 4 + len;
    if (!j.is_object() || !j.contains("op") || !j["op"].is_string()) {
      st = Bad("a frame that is not a JSON object with an 'op'");
      break;
    }
    frames->push_back(std::move(j));
  }
  buf_.erase(0, off);
  return st;
}

json ManifestToJson(const Manifest& m) {
  return {
      {"name", m.name},         {"version", m.version},     {"description", m.description},
      {"keywords", m.keywords}, {"examples", m.examples},   {"config_keys", m.config_keys},
      {"capacity", m.capacity}, {"timeout_s", m.timeout_s}, {"requires_config", m.requires_config}};
}

Status ManifestFromJson(const json& j, Manifest* out) {
  if (!j.is_object()) return Bad("the manifest is not an object");
  Manifest m;
  CORTEX_RETURN_IF_ERROR(Str(j, "name", 4096, &m.name));
  CORTEX_RETURN_IF_ERROR(Str(j, "version", 4096, &m.version));
  CORTEX_RETURN_IF_ERROR(Str(j, "description", 4096, &m.description, false));
  CORTEX_RETURN_IF_ERROR(StrList(j, "keywords", &m.keywords));
  CORTEX_RETURN_IF_ERROR(StrList(j, "examples", &m.examples));
  CORTEX_RETURN_IF_ERROR(StrList(j, "config_keys", &m.config_keys));
  auto cap = j.find("capacity");
  auto to = j.find("timeout_s");
  if (cap == j.end() || !cap->is_number_integer()) return Bad("'capacity' is not a whole number");
  if (to == j.end() || !to->is_number()) return Bad("'timeout_s' is not a number");
  const long c = cap->get<long>();
  m.capacity = c < 1 || c > 1024 ? 0 : static_cast<int>(c);
  m.timeout_s = to->get<double>();
  auto rc = j.find("requires_config");
  m.requires_config = rc != j.end() && rc->is_boolean() && rc->get<bool>();
  CORTEX_RETURN_IF_ERROR(ValidateManifest(m));
  *out = std::move(m);
  return Status::OK();
}

json TaskToJson(const Task& t, int64_t deadline_unix_ms) {
  json tags = json::array();
  for (const auto& [k, v] : t.tags) tags.push_back({k, v});
  return {{"id", t.id}, {"text", t.text}, {"tags", tags}, {"deadline_ms", deadline_unix_ms}};
}

Status TaskFromJson(const json& j, Task* t, int64_t* deadline_unix_ms) {
  if (!j.is_object()) return Bad("the task is not an object");
  CORTEX_RETURN_IF_ERROR(Str(j, "id", 256, &t->id));
  CORTEX_RETURN_IF_ERROR(Str(j, "text", kMaxFrame, &t->text));
  auto tags = j.find("tags");
  if (tags != j.end()) {
    if (!tags->is_array()) return Bad("'tags' is not a list");
    for (const auto& kv : *tags) {
      if (!kv.is_array() || kv.size() != 2 || !kv[0].is_string() || !kv[1].is_string())
        return Bad("a tag is not a [key, value] pair");
      t->tags.emplace_back(kv[0].get<std::string>(), kv[1].get<std::string>());
    }
  }
  auto d = j.find("deadline_ms");
  if (d == j.end() || !d->is_number_integer()) return Bad("'deadline_ms' is not a whole number");
  *deadline_unix_ms = d->get<int64_t>();
  return Status::OK();
}

json OutcomeToJson(const Outcome& o) {
  return {
      {"kind", ToString(o.kind)}, {"quality", o.quality}, {"error", o.error}, {"output", o.output}};
}

Status OutcomeFromJson(const json& j, Outcome* out) {
  if (!j.is_object()) return Bad("the outcome is not an object");
  std::string kind;
  CORTEX_RETURN_IF_ERROR(Str(j, "kind", 64, &kind));
  auto k = ParseOutcomeKind(kind);
  if (!k || *k == OutcomeKind::kInterrupted) return Bad("unknown outcome kind '" + kind + "'");
  Outcome o;
  o.kind = *k;
  auto q = j.find("quality");
  if (q == j.end() || !q->is_number()) return Bad("'quality' is not a number");
  const double qv = q->get<double>();
  o.quality = std::isnan(qv) ? 0.0 : std::clamp(qv, 0.0, 1.0);
  CORTEX_RETURN_IF_ERROR(Str(j, "error", 1024, &o.error, false));
  CORTEX_RETURN_IF_ERROR(Str(j, "output", kMaxExpertOutputBytes + 64, &o.output, false));
  *out = std::move(o);
  return Status::OK();
}

}  // namespace cortex::hostproto
