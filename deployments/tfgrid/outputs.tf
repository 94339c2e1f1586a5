# What `tierserve inventory --from-tofu` reads (`tofu output -json > out.json`). Keep the names and fields:
# serving/ops/inventory.py and its test fixture (tests/fixtures/tfgrid/tofu_output.json) follow them.
# Addresses are as the grid reports them: public ones with their prefix length (185.206.122.40/24).

output "tierserve_profile" {
  description = "The models.yaml profile the GPU VM serves (the inventory's tierserve_profile)."
  value       = var.profile
}

output "ssh_user" {
  description = "The user the SSH key is installed for."
  value       = "root"
}

output "gpu_vm" {
  description = "The GPU VM: Mycelium IPv6 (SSH, WireGuard), grid network IP, public addresses if reserved."
  value = {
    name        = grid_deployment.gpu.vms[0].name
    node_id     = grid_deployment.gpu.node
    mycelium_ip = grid_deployment.gpu.vms[0].mycelium_ip
    private_ip  = grid_deployment.gpu.vms[0].ip
    public_ipv4 = grid_deployment.gpu.vms[0].computedip
    public_ipv6 = grid_deployment.gpu.vms[0].computedip6
    gpus        = grid_deployment.gpu.vms[0].gpus
    console_url = grid_deployment.gpu.vms[0].console_url
  }
}

output "agent_vms" {
  description = "The agent VMs by name, with the same addresses."
  # Indexed rather than iterated through a function: the VMs' Mycelium seeds are sensitive, and a function over
  # the whole list would make this entire output sensitive.
  value = {
    for i, name in local.agent_names : name => {
      name        = grid_deployment.agents[0].vms[i].name
      node_id     = grid_deployment.agents[0].node
      mycelium_ip = grid_deployment.agents[0].vms[i].mycelium_ip
      private_ip  = grid_deployment.agents[0].vms[i].ip
      public_ipv4 = grid_deployment.agents[0].vms[i].computedip
      public_ipv6 = grid_deployment.agents[0].vms[i].computedip6
      console_url = grid_deployment.agents[0].vms[i].console_url
    }
  }
}

output "network" {
  description = "The grid network: name, range and its nodes."
  value = {
    name     = grid_network.net.name
    ip_range = grid_network.net.ip_range
    nodes    = grid_network.net.nodes
  }
}

output "wireguard_access_config" {
  description = "wg-quick config for the operator's machine into the grid network (wireguard_access = true), else empty."
  value       = grid_network.net.access_wg_config
  sensitive   = true
}
