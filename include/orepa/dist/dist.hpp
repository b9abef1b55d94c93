#pragma once
/// @file dist.hpp
/// Umbrella header of orepa's optional data-parallel component (CMake target
/// orepa::dist, which links MPI): DistributedDataParallel with synchronised BatchNorm,
/// the Communicator it runs on (every collective under a deadline), and
/// abort_on_exception, which ends the whole job when one rank throws. Not included by orepa/orepa.hpp: the core library
/// never needs MPI.

#include "orepa/dist/communicator.hpp"
#include "orepa/dist/ddp.hpp"
