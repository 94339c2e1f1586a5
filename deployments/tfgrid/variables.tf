# Inputs of the tierserve TFGrid deployment. Bounds follow the provider's own validators (tests/fixtures/tfgrid/
# provider_schema.json), so a bad value fails at `tofu plan` instead of half-way through an apply.

variable "tfgrid_network" {
  description = "ThreeFold Grid network: main, test, qa or dev."
  type        = string
  default     = "main"
  validation {
    condition     = contains(["main", "test", "qa", "dev"], var.tfgrid_network)
    error_message = "The value of tfgrid_network must be one of main, test, qa, dev."
  }
}

variable "name" {
  description = "Prefix of the network and deployment names (the grid allows letters, digits and _)."
  type        = string
  default     = "tierserve"
  validation {
    condition     = can(regex("^[a-z][a-z0-9_]{0,30}$", var.name))
    error_message = "The value of name must be 1-31 lowercase letters, digits or _, starting with a letter."
  }
}

variable "ssh_public_key" {
  description = "The operator's SSH public key (one line, e.g. the content of ~/.ssh/id_ed25519.pub); root's key on every VM."
  type        = string
  validation {
    condition     = can(regex("^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\\.com|sk-ecdsa-sha2-nistp256@openssh\\.com) [A-Za-z0-9+/]+=*( [^\\n]*)?$", trimspace(var.ssh_public_key)))
    error_message = "The value of ssh_public_key must be one OpenSSH public key line (ssh-ed25519 AAAA... comment), not a private key or a path."
  }
}

variable "profile" {
  description = "models.yaml profile the GPU VM serves: gpu (one 80 GB GPU) or local (tiny CPU models, a rehearsal without a GPU)."
  type        = string
  default     = "gpu"
  validation {
    condition     = contains(["gpu", "local"], var.profile)
    error_message = "The value of profile must be gpu or local (the cluster profile needs several GPU VMs in one Ray cluster)."
  }
}

# --- The GPU VM ---------------------------------------------------------------------------------------------

variable "gpu_node_id" {
  description = "Node id of the GPU node, rented by this account (dashboard: Deploy > Node Finder, filter GPU, Reserve). grid_scheduler cannot select by GPU, hence an id."
  type        = number
  validation {
    condition     = var.gpu_node_id > 0 && floor(var.gpu_node_id) == var.gpu_node_id
    error_message = "The value of gpu_node_id must be a positive whole number."
  }
}

variable "gpu_ids" {
  description = "GPUs passed through to the VM, as the node lists them (slot/vendor/device, e.g. 0000:0e:00.0/10de/2330; `tfcmd get gpus <node>` or the dashboard). [] only with profile = local."
  type        = list(string)
  validation {
    condition     = alltrue([for id in var.gpu_ids : can(regex("^[A-Za-z0-9:.]+/[A-Za-z0-9]+/[A-Za-z0-9]+$", id))]) && length(distinct(var.gpu_ids)) == length(var.gpu_ids)
    error_message = "The value of gpu_ids must be distinct ids of the form 0000:0e:00.0/10de/2330 (PCI slot/vendor/device)."
  }
}

variable "gpu_cpu" {
  description = "vCPUs of the GPU VM (the provider allows 1-32). Each tier's engine and the ingress take one or more."
  type        = number
  default     = 16
  validation {
    condition     = var.gpu_cpu >= 4 && var.gpu_cpu <= 32 && floor(var.gpu_cpu) == var.gpu_cpu
    error_message = "The value of gpu_cpu must be a whole number from 4 to 32."
  }
}

variable "gpu_memory_mb" {
  description = "Memory of the GPU VM in MB (the provider allows up to 262144). Weights pass through host memory while they load."
  type        = number
  default     = 65536
  validation {
    condition     = var.gpu_memory_mb >= 16384 && var.gpu_memory_mb <= 262144 && floor(var.gpu_memory_mb) == var.gpu_memory_mb
    error_message = "The value of gpu_memory_mb must be a whole number from 16384 to 262144."
  }
}

variable "gpu_disk_gb" {
  description = "Root disk of the GPU VM in GB: OS, the tierserve venv and the profile's weights. null: the profile's size (locals.profile_disk_gb)."
  type        = number
  default     = null
  validation {
    condition     = var.gpu_disk_gb == null ? true : (var.gpu_disk_gb >= 30 && var.gpu_disk_gb <= 10240 && floor(var.gpu_disk_gb) == var.gpu_disk_gb)
    error_message = "The value of gpu_disk_gb must be null or a whole number from 30 to 10240."
  }
}

variable "gpu_public_ipv4" {
  description = "Reserve a public IPv4 for the GPU VM (not needed: SSH and WireGuard run over Mycelium)."
  type        = bool
  default     = false
}

variable "gpu_public_ipv6" {
  description = "Reserve a public IPv6 for the GPU VM."
  type        = bool
  default     = false
}

# --- Agent VMs ----------------------------------------------------------------------------------------------

variable "agent_count" {
  description = "Number of agent VMs (agent1..agentN). Each gets its WireGuard address from its number, so removing one keeps the others'."
  type        = number
  default     = 2
  validation {
    condition     = var.agent_count >= 0 && var.agent_count <= 50 && floor(var.agent_count) == var.agent_count
    error_message = "The value of agent_count must be a whole number from 0 to 50."
  }
}

variable "agent_node_id" {
  description = "Node for the agent VMs. null: grid_scheduler picks one with room for all of them; the GPU node's id puts them on the rented node at no extra cost."
  type        = number
  default     = null
  validation {
    condition     = var.agent_node_id == null ? true : (var.agent_node_id > 0 && floor(var.agent_node_id) == var.agent_node_id)
    error_message = "The value of agent_node_id must be null or a positive whole number."
  }
}

variable "agent_farm_id" {
  description = "Farm the scheduler searches for the agents' node (null: any farm)."
  type        = number
  default     = null
  validation {
    condition     = var.agent_farm_id == null ? true : (var.agent_farm_id > 0 && floor(var.agent_farm_id) == var.agent_farm_id)
    error_message = "The value of agent_farm_id must be null or a positive whole number."
  }
}

variable "agent_cpu" {
  description = "vCPUs per agent VM (1-32)."
  type        = number
  default     = 2
  validation {
    condition     = var.agent_cpu >= 1 && var.agent_cpu <= 32 && floor(var.agent_cpu) == var.agent_cpu
    error_message = "The value of agent_cpu must be a whole number from 1 to 32."
  }
}

variable "agent_memory_mb" {
  description = "Memory per agent VM in MB."
  type        = number
  default     = 4096
  validation {
    condition     = var.agent_memory_mb >= 1024 && var.agent_memory_mb <= 262144 && floor(var.agent_memory_mb) == var.agent_memory_mb
    error_message = "The value of agent_memory_mb must be a whole number from 1024 to 262144."
  }
}

variable "agent_disk_gb" {
  description = "Root disk per agent VM in GB."
  type        = number
  default     = 30
  validation {
    condition     = var.agent_disk_gb >= 15 && var.agent_disk_gb <= 10240 && floor(var.agent_disk_gb) == var.agent_disk_gb
    error_message = "The value of agent_disk_gb must be a whole number from 15 to 10240."
  }
}

variable "agent_public_ipv4" {
  description = "Reserve a public IPv4 for every agent VM."
  type        = bool
  default     = false
}

# --- Network ------------------------------------------------------------------------------------------------

variable "network_ip_range" {
  description = "Private range of the grid network (a /16; each node gets a /24 of it). Must not hold tierserve's WireGuard overlay, 10.66.0.0/24."
  type        = string
  default     = "10.20.0.0/16"
  validation {
    condition     = can(cidrsubnet(var.network_ip_range, 0, 0)) && endswith(var.network_ip_range, "/16") && try(cidrsubnet(var.network_ip_range, 0, 0) == var.network_ip_range, false) && try(cidrhost(var.network_ip_range, 0) != "10.66.0.0", false)
    error_message = "The value of network_ip_range must be an IPv4 network address with a /16 mask (e.g. 10.20.0.0/16), not 10.66.0.0/16 (the WireGuard overlay)."
  }
}

variable "wireguard_access" {
  description = "Also generate a WireGuard config for the operator's machine into the grid network (output wireguard_access_config)."
  type        = bool
  default     = false
}
