#include "pg.h"

#include <fmt/format.h>

#include <cmath>
#include <cstdlib>
#include <vector>

#include "cortex/store_url.h"
#include "cortex/utf8.h"

namespace cortex::pg {

Param::Param(const std::string& s) {
  if (s.find('\0') == std::string::npos && InvalidUtf8At(s) == std::string::npos) {
    v = s;
    return;
  }
  v = ValidUtf8(s);
  for (char& c : v)
    if (c == '\0') c = '?';
}

Param::Param(double d) {
  if (std::isnan(d))
    v = "NaN";
  else if (std::isinf(d))
    v = d > 0 ? "Infinity" : "-Infinity";
  else
    v = fmt::format("{}", d);  // the shortest text that reads back as the same double
}

Param Param::Bytes(const std::string& b) {
  Param p(0);
  p.v = b;
  p.binary = true;
  return p;
}

double Result::Double(int row, int col) const {
  return Null(row, col) ? 0 : std::strtod(PQgetvalue(r_.get(), row, col), nullptr);
}

long Result::Long(int row, int col) const {
  // (numeric aggregates come as "12" or "12.000"; strtod reads both)
  return Null(row, col) ? 0
                        : static_cast<long>(std::strtod(PQgetvalue(r_.get(), row, col), nullptr));
}

std::string Result::Bytes(int row, int col) const {
  if (Null(row, col)) return {};
  size_t n = 0;
  unsigned char* b =
      PQunescapeBytea(reinterpret_cast<const unsigned char*>(PQgetvalue(r_.get(), row, col)), &n);
  if (!b) return {};
  std::string out(reinterpret_cast<const char*>(b), n);
  PQfreemem(b);
  return out;
}

long Result::Affected() const {
  const char* n = r_ ? PQcmdTuples(r_.get()) : "";
  return *n ? std::atol(n) : 0;
}

std::string Result::SqlState() const {
  const char* s = r_ ? PQresultErrorField(r_.get(), PG_DIAG_SQLSTATE) : nullptr;
  return s ? s : "";
}

Status Conn::Connect(const std::string& url, const std::string& purpose, bool short_transactions) {
  Close();
  url_ = url;
  purpose_ = purpose;
  short_transactions_ = short_transactions;
  // The URL's own settings win; these only fill in what it leaves out.
  const char* keys[] = {"fallback_application_name", "connect_timeout", "dbname", nullptr};
  const std::string app = "cortexd " + purpose;
  const char* values[] = {app.c_str(), "10", url.c_str(), nullptr};
  c_ = PQconnectdbParams(keys, values, /*expand_dbname=*/1);
  if (!c_) return Status::IOError("store: out of memory connecting to PostgreSQL");
  if (PQstatus(c_) != CONNECTION_OK)
    return Status::IOError("cannot connect to PostgreSQL at " + RedactUrl(url) + " (" + purpose +
                           "): " + Error());
  // Acknowledged means committed and flushed (also if the server's default says otherwise);
  // notices below a warning are noise in cortexd's log.
  Result r = Exec(short_transactions ? "SET synchronous_commit TO on; SET client_min_messages TO "
                                       "warning; SET idle_in_transaction_session_timeout TO '1s'"
                                     : "SET synchronous_commit TO on; SET client_min_messages TO "
                                       "warning");
  return r.status();
}

void Conn::Close() {
  if (c_) PQfinish(c_);
  c_ = nullptr;
  prepared_.clear();
  next_ = 0;
}

Status Conn::Reset() {
  if (!Broken()) return Status::OK();
  return Connect(url_, purpose_, short_transactions_);
}

std::string Conn::Error() const {
  std::string m = c_ ? PQerrorMessage(c_) : "not connected";
  while (!m.empty() && (m.back() == '\n' || m.back() == ' ')) m.pop_back();
  // libpq quotes what it could not parse: a token of the URL, or the whole of it.
  return RedactMessage(m, url_);
}

Result Conn::Check(PGresult* r) {
  const ExecStatusType s = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
  if (s == PGRES_COMMAND_OK || s == PGRES_TUPLES_OK) return Result(r, Status::OK());
  std::string m;
  if (const char* p = r ? PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY) : nullptr) {
    m = p;
    if (const char* d = PQresultErrorField(r, PG_DIAG_MESSAGE_DETAIL))
      m += std::string(" (") + d + ")";
  } else {
    m = Error();
  }
  return Result(r, Status::IOError("store: " + RedactMessage(m, url_)));
}

Result Conn::Exec(const char* sql) {
  if (!c_) return Result(Status::IOError("store: not connected to PostgreSQL"));
  return Check(PQexec(c_, sql));
}

Result Conn::Query(const char* sql, std::initializer_list<Param> params) {
  if (!c_) return Result(Status::IOError("store: not connected to PostgreSQL"));
  auto it = prepared_.find(sql);
  std::string name;
  if (it != prepared_.end() && it->second.first == sql) {
    name = it->second.second;
  } else {
    name = "c" + std::to_string(++next_);  // never reused: a replaced text gets a new name
    Result p = Check(PQprepare(c_, name.c_str(), sql, 0, nullptr));
    if (!p.ok()) return p;
    prepared_[sql] = {sql, name};
  }
  std::vector<const char*> values;
  std::vector<int> lengths, formats;
  for (const Param& p : params) {
    values.push_back(p.v.data());
    lengths.push_back(static_cast<int>(p.v.size()));
    formats.push_back(p.binary ? 1 : 0);
  }
  return Check(PQexecPrepared(c_, name.c_str(), static_cast<int>(values.size()), values.data(),
                              lengths.data(), formats.data(), 0));
}

}  // namespace cortex::pg
