# `pipeline` for CPUs, with data-parallel training over Open MPI (the `mpi`
# feature), and the seed recipes: what a Kubernetes Job, a SkyPilot task, a
# containerised Slurm job or `hf jobs run` starts without a build step.
# Nothing else: no Python, no compiler, no models (recipes fetch them).
#
#   docker build -t pipeline .                  # or: buildah bud -t pipeline .
#   docker run --rm -v "$PWD/cache:/work/.pipeline" -e HF_TOKEN pipeline \
#     run recipes/gemma3-270m-tool-use.toml --cache-dir s3://my-bucket/pipeline
#
# scripts/test-container.sh builds the runtime stage below with buildah
# (daemonless) around a binary built on the host, and runs it.
ARG DEBIAN=bookworm

# --- build: the release binary -------------------------------------------
FROM debian:${DEBIAN} AS build
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends ca-certificates curl gcc libc6-dev pkg-config \
      libopenmpi-dev libclang-dev \
 && rm -rf /var/lib/apt/lists/*
ARG RUST=1.89.0
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain ${RUST}
ENV PATH=/root/.cargo/bin:$PATH
WORKDIR /src
COPY . .
RUN cargo build --release --locked --features mpi --bin pipeline \
 && install -m 755 target/release/pipeline /pipeline

# --- runtime: the binary, Open MPI's launcher and libraries, the recipes ---
FROM debian:${DEBIAN}-slim AS runtime
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends ca-certificates openmpi-bin libopenmpi3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /pipeline /usr/local/bin/pipeline
COPY recipes /work/recipes
WORKDIR /work
ENV PIPELINE_PROGRESS=0
ENTRYPOINT ["pipeline"]
CMD ["--help"]
