# orepa_add_mpi_test(NAME name TARGET target [NP n] [TIMEOUT s] [ARGS ...])
# Registers a ctest test running `mpiexec -np n <target> ARGS`. The flags make it work
# the same for a user and as root in a container (CI):
#   --oversubscribe            more ranks than cores is allowed (a 1- or 2-core CI machine)
#   --mca pml ob1 --mca btl self,vader   shared memory on one node only: no network
#                              probing (MPI_Init ~90 ms instead of ~330 ms), no TCP sockets
#   btl_vader_single_copy_mechanism none  no cross-memory attach (CMA), which containers
#                              often forbid; here it is faster above 256 KB too
#   odls_base_sigkill_timeout 0  when one rank fails, the others are killed at once
# Environment: root may run mpiexec (no effect for other users), one OpenMP thread per
# rank (the ranks would fight over the cores otherwise), no gtest colours in the log.
# A hang fails instead of blocking CI: mpiexec's own time limit (MPIEXEC_TIMEOUT) fires
# 5 s before ctest's TIMEOUT, which is the backstop.
set(OREPA_MPIEXEC_FLAGS --oversubscribe --mca pml ob1 --mca btl self,vader
    --mca btl_vader_single_copy_mechanism none --mca odls_base_sigkill_timeout 0)
set(OREPA_MPI_TEST_ENV "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMP_NUM_THREADS=1;GTEST_COLOR=no")
if(OREPA_SANITIZE)
  # ASan and UBSan stay on; only leak detection is off for MPI programs: Open MPI 4.1
  # leaves ~120 KB allocated at MPI_Finalize, mostly in its plugins, which it unloads, so
  # LSan's stacks end in "<unknown module>" and no suppression can name them. Leaks of
  # orepa's own code are still checked by every other test (test_sync_bn.cpp covers the BN hook).
  string(APPEND OREPA_MPI_TEST_ENV ";ASAN_OPTIONS=detect_leaks=0:abort_on_error=1")
endif()

function(orepa_add_mpi_test)
  cmake_parse_arguments(T "" "NAME;TARGET;NP;TIMEOUT" "ARGS" ${ARGN})
  if(NOT T_NP)
    set(T_NP 2)
  endif()
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 120)
  endif()
  math(EXPR _inner "${T_TIMEOUT} - 5")
  add_test(NAME ${T_NAME}
           COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${T_NP} ${MPIEXEC_PREFLAGS} ${OREPA_MPIEXEC_FLAGS}
                   $<TARGET_FILE:${T_TARGET}> ${MPIEXEC_POSTFLAGS} ${T_ARGS})
  set_tests_properties(${T_NAME} PROPERTIES
                       ENVIRONMENT "${OREPA_MPI_TEST_ENV};MPIEXEC_TIMEOUT=${_inner}"
                       PROCESSORS ${T_NP} TIMEOUT ${T_TIMEOUT} LABELS mpi)
endfunction()

# orepa_add_mpi_fault_test(NAME name TARGET target BOUND s EXPECT regex... [ARGS ...] [ARGS1 ...]
#                          [MPIEXEC_FLAGS ...] [ANY_STATUS])
# Registers a ctest test for a job that must FAIL: `mpiexec -np 2 <target> ARGS` (or, with
# ARGS1, rank 0 runs `<target> ARGS` and rank 1 `<target> ARGS1`: mpiexec's MPMD form),
# run by tests/mpi/expect_fault.sh, which passes when the job exits non-zero, its output
# matches every EXPECT regex (grep -E; write `.` for characters special to CMake or the
# shell) and it ended within BOUND seconds; a hang is killed at 2 x BOUND + 10 s.
# MPIEXEC_FLAGS are added to mpiexec's; ANY_STATUS accepts exit status 0 too (see the script).
function(orepa_add_mpi_fault_test)
  cmake_parse_arguments(T "ANY_STATUS" "NAME;TARGET;BOUND" "EXPECT;ARGS;ARGS1;MPIEXEC_FLAGS" ${ARGN})
  set(_cmd ${MPIEXEC_EXECUTABLE} ${MPIEXEC_PREFLAGS} ${OREPA_MPIEXEC_FLAGS} ${T_MPIEXEC_FLAGS})
  if(T_ARGS1)
    list(APPEND _cmd ${MPIEXEC_NUMPROC_FLAG} 1 $<TARGET_FILE:${T_TARGET}> ${T_ARGS}
                     : ${MPIEXEC_NUMPROC_FLAG} 1 $<TARGET_FILE:${T_TARGET}> ${T_ARGS1})
  else()
    list(APPEND _cmd ${MPIEXEC_NUMPROC_FLAG} 2 $<TARGET_FILE:${T_TARGET}> ${T_ARGS})
  endif()
  set(_expect)
  if(T_ANY_STATUS)
    set(_expect --any-status)
  endif()
  foreach(_e IN LISTS T_EXPECT)
    list(APPEND _expect --expect ${_e})
  endforeach()
  math(EXPR _ctest_timeout "2 * ${T_BOUND} + 30")
  add_test(NAME ${T_NAME}
           COMMAND bash ${PROJECT_SOURCE_DIR}/tests/mpi/expect_fault.sh --bound ${T_BOUND} ${_expect} -- ${_cmd})
  set_tests_properties(${T_NAME} PROPERTIES ENVIRONMENT "${OREPA_MPI_TEST_ENV}" PROCESSORS 2
                       TIMEOUT ${_ctest_timeout} LABELS mpi)
endfunction()
