/* MPI_IN_PLACE is a macro whose value differs between MPI libraries (Open MPI: (void *) 1,
 * MPICH: (void *) -1); the Rust bindings do not export it, so ctseg takes it from mpi.h. */
#include <mpi.h>

void *ctseg_mpi_in_place(void) { return MPI_IN_PLACE; }
