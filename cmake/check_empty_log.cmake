# Fails when the log file LOG is non-empty (used to make Doxygen warnings errors).
if(EXISTS "${LOG}")
  file(READ "${LOG}" _log)
  if(NOT _log STREQUAL "")
    message(FATAL_ERROR "Doxygen warnings (see ${LOG}):\n${_log}")
  endif()
endif()
