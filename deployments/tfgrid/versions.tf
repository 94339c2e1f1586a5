terraform {
  # OpenTofu 1.6+ (Terraform 1.5+ reads it too): validation blocks, lifecycle preconditions, one().
  required_version = ">= 1.6.0"

  required_providers {
    # Schema read from the provider's source at b7d1a8c (development, after v1.11.2-dev): grid_scheduler's
    # `yggdrasil`/`wireguard` flags and a mount's `name` (v1.11.1: `disk_name`) are from there, so older
    # releases reject this configuration. tests/unit/test_tfgrid.py checks every name against that schema.
    grid = {
      source  = "threefoldtech/grid"
      version = ">= 1.11.2, < 2.0.0"
    }
    # random_bytes (3.6+): the Mycelium keys and IP seeds, generated once and kept in the state.
    random = {
      source  = "hashicorp/random"
      version = "~> 3.6"
    }
  }
}

# The account's mnemonic comes from the environment (MNEMONIC), never from a file in the repository.
provider "grid" {
  network = var.tfgrid_network
}
