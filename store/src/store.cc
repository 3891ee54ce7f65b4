#include "backends.h"
#include "cortex/store_url.h"

namespace cortex {

Result<std::unique_ptr<Store>> OpenStore(const std::string& path) {
  return IsPostgresUrl(path) ? OpenPostgresStore(path) : OpenSqliteStore(path);
}

Status ProbeStore(const std::string& path) {
  return IsPostgresUrl(path) ? ProbePostgresStore(path) : Status::OK();
}

}  // namespace cortex
