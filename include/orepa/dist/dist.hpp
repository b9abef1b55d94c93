#pragma once
/// @file dist.hpp
/// Umbrella header of orepa's optional data-parallel component (CMake target
/// orepa::dist, which links MPI): DistributedDataParallel with synchronised BatchNorm
/// and the Communicator it runs on. Not included by orepa/orepa.hpp: the core library
/// never needs MPI.

#include "orepa/dist/communicator.hpp"
#include "orepa/dist/ddp.hpp"
