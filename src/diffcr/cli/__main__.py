from diffcr.cli import main

main()
