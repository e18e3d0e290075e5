# Packer 1.7+ fetches the builders with `packer init .`; the template itself is
# cio-worker.pkr.hcl (Packer 1.6, which bundles both builders, validates that file alone).
packer {
  required_plugins {
    googlecompute = { source = "github.com/hashicorp/googlecompute", version = ">= 1.1.0" }
    amazon        = { source = "github.com/hashicorp/amazon", version = ">= 1.2.0" }
  }
}
