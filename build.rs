//! Build script: with the `mpi` feature, compiles the tiny C shim that exports `MPI_IN_PLACE`
//! from the MPI library's own header.

fn main() {
    println!("cargo:rerun-if-changed=src/comm/mpi_shim.c");
    #[cfg(feature = "mpi")]
    {
        let lib = match build_probe_mpi::probe() {
            Ok(lib) => lib,
            Err(errs) => {
                for e in errs {
                    println!("cargo:warning=MPI probe: {e}");
                }
                panic!(
                    "the `mpi` feature needs an MPI library: install e.g. Debian's openmpi-bin libopenmpi-dev (and libclang-dev)"
                );
            }
        };
        let mut build = cc::Build::new();
        build.file("src/comm/mpi_shim.c");
        for p in &lib.include_paths {
            build.include(p);
        }
        build.compile("ctseg_mpi_shim");
    }
}
