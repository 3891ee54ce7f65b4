// The store backends OpenStore chooses between (store.cc).
#pragma once

#include <memory>
#include <string>

#include "cortex/store.h"

namespace cortex {

Result<std::unique_ptr<Store>> OpenSqliteStore(const std::string& path);
Result<std::unique_ptr<Store>> OpenPostgresStore(const std::string& url);
Status ProbePostgresStore(const std::string& url);

}  // namespace cortex
