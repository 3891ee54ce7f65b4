# Every required dependency comes from Debian packages; CUDA is probed and optional.
find_package(PkgConfig REQUIRED)
find_package(Threads REQUIRED)
find_package(SQLite3 REQUIRED)
find_package(yaml-cpp REQUIRED)
find_package(fmt REQUIRED)
find_package(nlohmann_json 3.10 REQUIRED)
find_package(CLI11 REQUIRED)
find_package(Boost 1.74 REQUIRED)  # Boost.DLL is header-only; we use it with std::filesystem
find_package(BLAS REQUIRED)         # OpenBLAS on Debian: CPU matrix work
# RE2: rule regexes run in time linear in the text (std::regex backtracks and recurses).
pkg_check_modules(RE2 REQUIRED IMPORTED_TARGET re2)
# libpq (Debian libpq-dev): the PostgreSQL store.
pkg_check_modules(LIBPQ REQUIRED IMPORTED_TARGET libpq)
# cpp-httplib (Debian builds it as a library): the /metrics endpoint.
pkg_check_modules(HTTPLIB REQUIRED IMPORTED_TARGET cpp-httplib)

# yaml-cpp 0.7 on Debian exports the plain `yaml-cpp` target.
if(TARGET yaml-cpp::yaml-cpp)
  set(CORTEX_YAML_TARGET yaml-cpp::yaml-cpp)
else()
  set(CORTEX_YAML_TARGET yaml-cpp)
endif()

# --- CUDA: probe the toolkit, never require a GPU -----------------------------------
set(CORTEX_HAVE_CUDA OFF)
if(NOT CORTEX_CUDA STREQUAL "OFF")
  if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    enable_language(CUDA)
    find_package(CUDAToolkit)
  endif()
  if(CMAKE_CUDA_COMPILER AND CUDAToolkit_FOUND AND TARGET CUDA::cublas)
    set(CORTEX_HAVE_CUDA ON)
    # CMake does not know nvcc's C++20 flag for every toolkit; the .cu files need only 17.
    set(CMAKE_CUDA_STANDARD 17)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "52")
      # Hopper (the lent H100/H200) plus a PTX fallback for other cards.
      set(CMAKE_CUDA_ARCHITECTURES 90 CACHE STRING "" FORCE)
    endif()
    message(STATUS "cortex: CUDA backend ON (toolkit ${CUDAToolkit_VERSION})")
  elseif(CORTEX_CUDA STREQUAL "ON")
    message(FATAL_ERROR "cortex: CORTEX_CUDA=ON but no CUDA toolkit with cuBLAS was found")
  else()
    message(STATUS "cortex: CUDA toolkit not found, CPU backend only")
  endif()
else()
  message(STATUS "cortex: CUDA backend disabled (CORTEX_CUDA=OFF)")
endif()

# --- jemalloc for the daemon: probe, else glibc's malloc --------------------------------
# cortexd's threads allocate many small objects per task (JSON, statements, strings);
# under load glibc's malloc took about a tenth of its time (docs/BENCHMARKS.md). Not in
# sanitized or fuzzing builds, which bring their own allocator, nor in the plugin host,
# whose memory limit relies on malloc failing cleanly.
add_library(cortex_malloc INTERFACE)
find_library(CORTEX_JEMALLOC NAMES jemalloc)
if(CORTEX_JEMALLOC AND NOT CORTEX_SANITIZE AND NOT CORTEX_FUZZ)
  # Linked even though nothing names it: it replaces malloc by being there.
  target_link_libraries(cortex_malloc INTERFACE -Wl,--push-state,--no-as-needed
                                                ${CORTEX_JEMALLOC} -Wl,--pop-state)
  message(STATUS "cortex: malloc from jemalloc (${CORTEX_JEMALLOC})")
else()
  message(STATUS "cortex: malloc from glibc")
endif()
